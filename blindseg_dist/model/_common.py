"""What the CNN backbones (model/backbones.py) and the ViT backbone (model/vit.py) share: the
Backbone interface, the BlindNet IN layer, reading a local state dict, and a key list for logs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Backbone", "ChannelsLastIN", "instance_norm", "load_state_dict_file", "preview_keys"]


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    """The BlindNet IN layer: no affine parameters, no running statistics, eps 1e-5."""
    return nn.InstanceNorm2d(channels, eps=1e-5, affine=False, track_running_stats=False)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a local .pth/.pt (torch.save) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {path}. Give the path of a local ImageNet state dict "
            f"(.pth/.pt or .safetensors); nothing is downloaded. Use pretrained=None for random init."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path} is not a flat state dict of tensors (parameter name -> tensor); "
            f"save one with torch.save(model.state_dict(), path)."
        )
    return state


@contextmanager
def _frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """BN layers in ``module`` normalize with batch statistics but leave running stats unchanged."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class Backbone(nn.Module):
    """Interface of every backbone; ``forward(x) -> (feats, in_feats)`` as in the module doc."""

    channels: tuple[int, int, int, int]
    """Channels of the four stage outputs (low-level, mid, aux source, high)."""
    in_channels: tuple[int, int, int]
    """Channels of the three recorded IN outputs."""
    output_stride: int
    """Input size / size of the last stage output."""
    grad_checkpointing: bool
    """Recompute the stages in backward (torch.utils.checkpoint) to save activation memory."""

    def _stage(self, fn: Callable[[Tensor], Any], x: Tensor, module: nn.Module) -> Any:
        """Run one stage ``fn`` (whose weights are ``module``), checkpointed when enabled and a
        backward pass will follow. The recomputation leaves BN running statistics alone, so each
        forward updates them once, as without checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), _frozen_bn_statistics(module)))
        return fn(x)

    frozen_modules: list[str] = []
    """Names of the modules of a frozen encoder (model/freeze.py): kept in eval mode by ``train``."""

    def train(self, mode: bool = True) -> "Backbone":
        """``nn.Module.train``, except that a frozen encoder stays in eval mode (no dropout or
        drop-path, BN running statistics unchanged); adapters inside it (LoRA) follow ``mode``."""
        super().train(mode)
        for name in self.frozen_modules:
            self.get_submodule(name).eval()
        if mode and self.frozen_modules:
            for m in self.adapter_modules():
                m.train(True)
        return self

    def adapter_modules(self) -> list[nn.Module]:
        """Trainable modules inside the frozen encoder (LoRA layers' adapters and dropout)."""
        return []

    def encoder_modules(self) -> list[nn.Module]:
        """The modules of the encoder (what ``model.freeze_backbone`` freezes): those of ``layer_groups``."""
        return [item for group in self.layer_groups() for item in group if isinstance(item, nn.Module)]

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """The encoder's parameters in depth order, one group per layer id: [stem / patch embedding],
        then one group per block (residual block, ConvNeXt/Swin block, ViT block). Layer-wise lr
        decay and model.freeze_blocks read them (engine/optim.py, model/freeze.py); parameters in
        no group (a ViT's pyramid, a final norm) are the neck, above the last block."""
        raise NotImplementedError


def preview_keys(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` of ``keys`` for a log line ("none" when empty)."""
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "") if keys else "none"


class ChannelsLastIN(nn.Module):
    """Affine-free IN on an NHWC tensor (timm stages that emit NHWC, e.g. Swin)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = instance_norm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B,H,W,C) -> (B,C,H,W) -> (B,H,W,C)
