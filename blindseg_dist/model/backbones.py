"""Backbones with three affine-free InstanceNorm points (docs/METHOD.md, "Model").

Every backbone maps an image (B, 3, H, W) to ``(feats, in_feats)``:
  feats:    four stage outputs [low-level (1/4), mid, aux source, high (1/output_stride)];
  in_feats: the three InstanceNorm outputs recorded for CML/CCL.

Two families behind one registry (``build_backbone``):
  "resnet18" | "resnet34" | "resnet50" | "resnet101": torchvision ResNets, the exact BlindNet
      encoder. IN replaces the stem BN (before ReLU and max-pool) and sits in the last block of
      layer1 and layer2 after the residual add, before the final ReLU. The recorded IN outputs are
      pre-ReLU: 64 ch at 1/2, 256 ch at 1/4 and 512 ch at 1/8 for ResNet-50.
  "timm:<name>": any timm model with a ``features_only`` feature list (ResNet, ConvNeXt, Swin,
      PVT-v2, ...). IN is applied to the outputs of the first three of its last four stages and
      feeds the next stage; channel counts come from ``feature_info``. Output stride: ``output_stride``
      other than 32 is passed to timm (ResNets and ConvNeXt support 8/16); models without dilation
      (Swin, PVT-v2) need ``output_stride=32``, their native stride.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from ..errors import ConfigError
from ._common import Backbone, ChannelsLastIN, instance_norm, load_state_dict_file, preview_keys
from .pretrained import identify_weights
from .vit import ViTBackbone, is_vit

__all__ = [
    "Backbone",
    "ResNetBackbone",
    "TimmBackbone",
    "build_backbone",
    "check_backbone",
    "instance_norm",
    "load_state_dict_file",
    "BACKBONES",
]

_log = logging.getLogger(__name__)

_TORCHVISION_RESNETS: dict[str, Callable[..., tv_resnet.ResNet]] = {
    "resnet18": tv_resnet.resnet18,
    "resnet34": tv_resnet.resnet34,
    "resnet50": tv_resnet.resnet50,
    "resnet101": tv_resnet.resnet101,
}
BACKBONES: tuple[str, ...] = (*_TORCHVISION_RESNETS, "timm:<name>")
"""Names accepted by ``build_backbone``."""


def check_backbone(name: str) -> None:
    """Raise ConfigError naming model.backbone when ``name`` is neither a torchvision ResNet of
    BACKBONES nor ``timm:<a model timm has>`` (build_model and the trainer's set-up call it)."""
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:8]}*")[:5]
            raise ConfigError(f"config key 'model.backbone': value {name!r}: timm has no model "
                              f"{arch!r}" + (f" (similar: {', '.join(close)})" if close else ""))
    elif name not in BACKBONES:
        raise ConfigError(f"config key 'model.backbone': value {name!r} is not allowed; choose one of "
                          f"{list(BACKBONES)} (timm:<name> for any timm model, e.g. timm:convnext_tiny)")


def _residual_sum(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision residual block up to the residual add (its final ReLU not applied)."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, tv_resnet.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:  # BasicBlock
        out = block.bn2(block.conv2(out))
    return out + identity


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Trade a ResNet stage's stride 2 for dilation, as the released BlindNet/RobustNet code does:
    every conv of the stage gets stride 1 and the 3x3 convs of EVERY block, the first included,
    use ``dilation`` (torchvision's replace_stride_with_dilation keeps the previous dilation in
    the first block; the released network does not)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


class ResNetBackbone(Backbone):
    """torchvision ResNet with IN at the stem and after the last residual add of layer1/layer2.

    Parameter names equal torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``, ...) minus
    the replaced stem BN (``bn1.*``) and the classifier (``fc.*``), so ImageNet state dicts load.
    """

    def __init__(self, name: str, output_stride: int = 16, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32 for {name}, got {output_stride}")
        net = _TORCHVISION_RESNETS[name](weights=None)
        self.arch = name
        self.pretrained_report: dict[str, Any] | None = None
        # OS16: layer4 at dilation 2; OS8: layer3 at 2 and layer4 at 4 (every block of the stage)
        if output_stride <= 16:
            _dilate(net.layer4, dilation=32 // output_stride)
        if output_stride == 8:
            _dilate(net.layer3, dilation=2)
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # A stage's last block has no downsample: its input width is the stage's output width.
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        self.channels = tuple(layer[-1].conv1.in_channels for layer in layers)
        self.in_channels = (net.conv1.out_channels, self.channels[0], self.channels[1])
        # IN points: stem (replaces bn1), last block of layer1, last block of layer2.
        self.in_norms = nn.ModuleList(instance_norm(c) for c in self.in_channels)
        self.output_stride = output_stride
        self.grad_checkpointing = grad_checkpointing

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        return [[self.conv1], *([block] for layer in layers for block in layer)]

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.in_norms[0](self.conv1(x))
        return self.maxpool(F.relu(pre)), pre

    def _in_layer(self, index: int, layer: nn.Sequential) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        def run(x: Tensor) -> tuple[Tensor, Tensor]:
            x = layer[:-1](x)
            pre = self.in_norms[index](_residual_sum(layer[-1], x))
            return F.relu(pre), pre  # not in place: pre is recorded

        return run

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        x, in0 = self._stage(self._stem, x, self.conv1)
        c1, in1 = self._stage(self._in_layer(1, self.layer1), x, self.layer1)
        c2, in2 = self._stage(self._in_layer(2, self.layer2), c1, self.layer2)
        c3 = self._stage(self.layer3, c2, self.layer3)
        c4 = self._stage(self.layer4, c3, self.layer4)
        return [c1, c2, c3, c4], [in0, in1, in2]

    def load_pretrained(self, path: str | Path) -> dict[str, Any]:
        """Load a torchvision-style ImageNet state dict; the stem BN (replaced by IN) and fc are
        skipped. Returns (and logs) a report: which file it is by sha256 (model/pretrained.py:
        torchvision V1 / V2 / unknown, with a warning for anything but V1), and the tensors
        loaded, skipped, missing and unexpected. Also kept as ``self.pretrained_report``."""
        state = load_state_dict_file(path)
        own = self.state_dict()
        skipped = sorted(k for k in state if k.startswith(("bn1.", "fc.")))
        unexpected = sorted(k for k in state if k not in own and k not in skipped)
        missing = sorted(k for k in own if k not in state)
        if len(missing) == len(own):
            raise ValueError(
                f"{path}: no key matches a torchvision ResNet (first keys: {list(state)[:3]}); "
                f"expected names like 'conv1.weight', 'layer1.0.conv1.weight'."
            )
        bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
               for k in own if k in state and state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{path}: shape mismatch (wrong ResNet depth?): " + "; ".join(bad[:5]))
        self.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        report = identify_weights(path, self.arch)
        report.update(loaded=len(own) - len(missing), skipped=skipped, missing=missing, unexpected=unexpected)
        log = _log.info if report["level"] == "info" else _log.warning
        log("pretrained %s; loaded %d tensors (skipped the replaced stem BN and fc: %d)",
            report["message"], report["loaded"], len(skipped))
        if missing or unexpected:
            _log.warning("%s: %d missing keys (left at random init): %s; %d unexpected keys (ignored): %s",
                         path, len(missing), preview_keys(missing), len(unexpected), preview_keys(unexpected))
        self.pretrained_report = report
        return report


_TIMM_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "swin_": {"strict_img_size": False},  # any input size (pads to the window; masks built per size)
}


class TimmBackbone(Backbone):
    """A timm ``features_only`` model: the last four stages; IN on the outputs of the first three."""

    def __init__(
        self,
        name: str,
        output_stride: int = 16,
        pretrained: str | Path | None = None,
        grad_checkpointing: bool = False,
        timm_kwargs: dict[str, Any] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        import timm

        kwargs: dict[str, object] = {**(timm_kwargs or {}), "features_only": True, "out_indices": (-4, -3, -2, -1)}
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        for prefix, extra in _TIMM_EXTRA_KWARGS.items():
            if name.startswith(prefix):
                kwargs.update(extra)
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if pretrained is not None:
            path = Path(pretrained)
            if not path.is_file():
                load_state_dict_file(path)  # raises the clear "not found" error
            # A local file only: clear every remote source so timm cannot download.
            kwargs["pretrained_cfg_overlay"] = {"file": str(path), "source": "", "url": "", "hf_hub_id": ""}
        try:
            body = timm.create_model(name, pretrained=pretrained is not None, **kwargs)
        except TypeError as err:
            if "output_stride" in str(err):
                raise ValueError(
                    f"timm model {name!r} has no output_stride option (no dilated stages); "
                    f"set output_stride=32, its native stride."
                ) from err
            raise
        if not hasattr(body, "return_layers"):
            raise ValueError(f"timm model {name!r} has no stage-wise feature list; use a hierarchical CNN, "
                             "a hierarchical ViT (Swin) or a plain ViT (ViT, DINOv2, EVA-02; model/vit.py)")
        self.body = body
        info = body.feature_info
        self.channels = tuple(info.channels())
        self.in_channels = self.channels[:3]
        self.output_stride = info.reduction()[-1]
        if self.output_stride != output_stride:
            raise ValueError(f"timm model {name!r} gives output stride {self.output_stride}, asked {output_stride}")
        self.nhwc = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        norm = ChannelsLastIN if self.nhwc else instance_norm
        self.in_norms = nn.ModuleList(norm(c) for c in self.in_channels)
        self.grad_checkpointing = grad_checkpointing

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """Stem pieces first; each stage's blocks in order, the stage's other modules (downsample,
        norm) with its first block."""
        groups: list[list[nn.Module | nn.Parameter]] = [[]]
        for name, module in self.body.items():
            if name not in self.body.return_layers:
                (groups[0] if len(groups) == 1 else groups[-1]).append(module)
                continue
            blocks = list(module.blocks) if hasattr(module, "blocks") else [module]
            rest = [m for n, m in module.named_children() if n != "blocks"] if hasattr(module, "blocks") else []
            groups.append([*rest, blocks[0]])
            groups.extend([b] for b in blocks[1:])
        return groups

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats: list[Tensor] = []
        for name, module in self.body.items():
            if name not in self.body.return_layers:
                x = module(x)  # stem pieces, possibly in-place: never checkpointed
                continue
            x = self._stage(module, x, module)
            if len(feats) < 3:
                x = self.in_norms[len(feats)](x)  # the IN output feeds the next stage
            feats.append(x.permute(0, 3, 1, 2) if self.nhwc else x)  # NHWC -> NCHW view
        return feats, feats[:3]


def build_backbone(
    name: str,
    *,
    output_stride: int = 16,
    pretrained: str | Path | None = None,
    grad_checkpointing: bool = False,
    vit: dict[str, Any] | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Build a backbone by name: "resnet18/34/50/101" (torchvision) or "timm:<model name>"; a timm
    plain ViT (ViT, DeiT, CLIP, DINOv2, EVA-02) gets model/vit.py's ViTBackbone with the options
    ``vit`` (blocks, in_points, pyramid_channels, drop_path). ``timm_kwargs`` go to timm.create_model
    (e.g. {"depth": 2} for a small test model)."""
    adapter = (vit or {}).get("adapter", "none")
    if name.startswith("timm:"):
        arch = name[len("timm:"):]
        if not is_vit(arch) and (adapter != "none" or (vit or {}).get("patch_size")):
            raise ValueError(f"model.adapter={adapter} / model.patch_size need a plain ViT (ViT, DINOv2, DINOv3, "
                             f"EVA-02); {arch!r} is not one")
        if is_vit(arch):
            return ViTBackbone(arch, output_stride, pretrained, grad_checkpointing, timm_kwargs=timm_kwargs,
                               **(vit or {}))
        return TimmBackbone(arch, output_stride, pretrained, grad_checkpointing, timm_kwargs=timm_kwargs,
                            drop_path=(vit or {}).get("drop_path", 0.0))  # (the other ViT options: plain ViTs only)
    if name not in _TORCHVISION_RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if adapter != "none":
        raise ValueError(f"model.adapter={adapter} needs a plain ViT backbone (timm:vit_*, DINOv2, DINOv3, EVA-02), "
                         f"not {name}")
    backbone = ResNetBackbone(name, output_stride, grad_checkpointing)
    if pretrained is not None:
        backbone.load_pretrained(pretrained)
    return backbone
