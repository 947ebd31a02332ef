"""SegNet: backbone with IN + DeepLabV3+ decoder, plus BlindNet's training-only heads.

Nothing BlindNet adds runs at inference: in eval mode the network is a plain DeepLabV3+ with
three affine-free IN layers. The two-view loss combination lives in model/objective.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PROJ_LEVELS
from .backbones import Backbone, build_backbone, check_backbone
from .deeplab import AuxHead, DeepLabV3PlusDecoder, ProjectionHead, init_weights, upsample
from .freeze import freeze_encoder
from .mask2former import M2F_DEFAULT_PROJ_LEVELS, M2F_LEVELS

__all__ = ["SegNet", "build_model", "count_parameters", "PROJ_LEVELS", "DEFAULT_PROJ_LEVELS", "DECODE_HEADS",
           "default_proj_levels"]

DECODE_HEADS: tuple[str, ...] = ("deeplabv3plus", "mask2former")
"""model.decode_head: DeepLabV3+ (model/deeplab.py) | Mask2Former (model/mask2former.py)."""

# PROJ_LEVELS (config.py): features a projection head can read: the four backbone outputs (low-level
# 1/4, mid, aux source, high = last), the decoder input dec0 (256 + 48 ch, 1/4) and output dec1 (256 ch, 1/4).
DEFAULT_PROJ_LEVELS: tuple[str, str, str] = ("high", "dec0", "dec1")
"""The BlindNet levels (for a CNN and a ViT alike: the last backbone map, decoder input, decoder output)."""
_BACKBONE_LEVELS = ("low", "mid", "aux", "high")


def default_proj_levels(decode_head: str) -> tuple[str, str, str]:
    """The head's BlindNet levels: (high, dec0, dec1) on DeepLabV3+, (pd16, pd8, mask) on Mask2Former."""
    return M2F_DEFAULT_PROJ_LEVELS if decode_head == "mask2former" else DEFAULT_PROJ_LEVELS


class SegNet(nn.Module):
    """Backbone + decode head (DeepLabV3+ or Mask2Former); see ``forward`` for the eval / train outputs."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        aux: bool,
        proj_heads: bool,
        proj_dim: int,
        channels_last: bool,
        proj_levels: Sequence[str] = (),
        decode_head: str = "deeplabv3plus",
        mask2former: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        low, mid_, mid, high = backbone.channels
        if decode_head not in DECODE_HEADS:
            raise ValueError(f"model.decode_head: {decode_head!r} is not one of {list(DECODE_HEADS)}")
        self.decode_head = decode_head
        m2f = decode_head == "mask2former"
        proj_levels = tuple(proj_levels) or default_proj_levels(decode_head)
        allowed = _BACKBONE_LEVELS + (M2F_LEVELS if m2f else ("dec0", "dec1"))
        if len(proj_levels) != 3 or any(p not in allowed for p in proj_levels):
            raise ValueError(f"model.proj_levels: {list(proj_levels)!r} must be 3 of {list(allowed)} "
                             f"with model.decode_head={decode_head} ([] = {list(default_proj_levels(decode_head))})")
        self.proj_levels = proj_levels
        self.backbone = backbone
        if m2f:
            from .mask2former import Mask2FormerHead

            opts = dict(mask2former or {})
            tokens = backbone.tokens() if callable(getattr(backbone, "tokens", None)) else None
            if tokens is not None:  # Rein: its tokens are the queries (released link_token_to_query)
                if opts.setdefault("queries", tokens.shape[1]) != tokens.shape[1]:
                    raise ValueError(f"model.m2f_queries={opts['queries']}: with Rein's tokens as the queries it must "
                                     f"equal the tokens per layer ({tokens.shape[1]}, model.rein_tokens)")
                opts["token_dim"] = tokens.shape[-1]
            self.decoder = Mask2FormerHead(backbone.channels, getattr(backbone, "strides", (4, 8, 16, backbone.output_stride)),
                                           num_classes, **opts)
            hd = self.decoder.hidden_dim
            width = dict(low=low, mid=mid_, aux=mid, high=high, pd32=hd, pd16=hd, pd8=hd, mask=hd)
        else:
            self.decoder = DeepLabV3PlusDecoder(low, high, num_classes, backbone.output_stride)
            width = dict(low=low, mid=mid_, aux=mid, high=high, dec0=256 + 48, dec1=256)
        self.aux_head = AuxHead(mid, num_classes) if aux else None
        # One head per level j of proj_levels; default 0 = last stage, 1 = dec0 (256 + 48 ch), 2 = dec1 (256 ch).
        self.proj_heads = (
            nn.ModuleList(ProjectionHead(width[p], proj_dim) for p in proj_levels) if proj_heads else None
        )
        self.channels_last = channels_last
        for head in (None if m2f else self.decoder, self.aux_head, self.proj_heads):  # Mask2Former: its own init
            if head is not None:
                init_weights(head)

    def inference_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters used by the eval-mode forward (backbone and decoder)."""
        yield from self.backbone.parameters()
        yield from self.decoder.parameters()

    def embed_rows(self, level: int, rows: Tensor) -> Tensor:
        """Projection head ``level`` on feature rows (P, C) -> L2-normalized (P, proj_dim).

        The heads are per-pixel (1x1 convs), so this equals the dense head at those pixels."""
        return self.proj_heads[level].rows(rows)

    def _query_tokens(self) -> Tensor | None:
        """Rein's layer tokens [L, T, C] when the head takes its queries from them, else None."""
        if self.decode_head != "mask2former" or self.decoder.token_queries is None:
            return None
        return self.backbone.tokens()

    def forward(
        self, x: Tensor, *, with_aux: bool = True, dense_embeds: bool = True
    ) -> Tensor | dict[str, Tensor | list[Tensor] | None]:
        """Eval: logits (B, C, H, W) (Mask2Former: the class scores of ``semantic_inference``). Train: dict with

        "logits" (B, C, H, W); "logits_q" (B, C, H/4, W/4); "aux" (B, C, H/os, W/os) from the third
        stage, or None; "in_feats" the three IN outputs; "embeds" three L2-normalized (B, proj_dim, h, w)
        projections of the proj_levels (default [last stage, dec0, dec1]), or None. ``with_aux=False`` skips the aux head (the
        augmented view: its aux logits are never used, and running it would also feed that view into
        the aux head's BN statistics). ``dense_embeds=False`` returns the heads' inputs as
        "proj_inputs" [last stage, dec0, dec1] instead of "embeds", for ``embed_rows``.
        Mask2Former: "logits_q" / "logits" are the semantic inference at 1/4 / resized to the input,
        and "m2f" holds every decoder layer's "class_logits" and "mask_logits" (the set loss's input).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats, in_feats = self.backbone(x)
        extra: dict[str, Any] = {}
        if self.decode_head == "mask2former":
            out = self.decoder(feats, self._query_tokens(), all_layers=self.training)
            if not self.training:
                return self.decoder.eval_scores(out["class_logits"][-1], out["mask_logits"][-1], x.shape[-2:])
            from .mask2former import semantic_inference

            logits_q = semantic_inference(out["class_logits"][-1], out["mask_logits"][-1])
            named = dict(low=feats[0], mid=feats[1], aux=feats[2], high=feats[3], **out["levels"])
            extra["m2f"] = {"class_logits": out["class_logits"], "mask_logits": out["mask_logits"]}
        else:
            logits_q, dec0, dec1 = self.decoder(feats[0], feats[3])
            if not self.training:
                return upsample(logits_q, x.shape[-2:])
            named = dict(low=feats[0], mid=feats[1], aux=feats[2], high=feats[3], dec0=dec0, dec1=dec1)
        logits = upsample(logits_q, x.shape[-2:])
        levels = [named[p] for p in self.proj_levels]
        return {
            "logits": logits,
            "logits_q": logits_q,
            "aux": self.aux_head(feats[2]) if self.aux_head is not None and with_aux else None,
            "in_feats": in_feats,
            "embeds": (
                [head(f) for head, f in zip(self.proj_heads, levels)]
                if self.proj_heads is not None and dense_embeds
                else None
            ),
            "proj_inputs": levels if self.proj_heads is not None and not dense_embeds else None,
            **extra,
        }


def _freeze(net: SegNet, adapter: str, freeze_backbone: bool, freeze_blocks: int) -> None:
    """model.freeze_backbone / model.freeze_blocks on ``net``'s encoder (model/freeze.py); with an
    adapter the encoder is frozen already, and freeze_blocks is refused."""
    if adapter != "none" and freeze_blocks:
        raise ValueError(f"model.freeze_blocks={freeze_blocks} with model.adapter={adapter}: an adapter freezes the "
                         "whole encoder already; set model.freeze_blocks=0")
    if adapter == "none" and (freeze_backbone or freeze_blocks):  # an adapter froze the encoder already
        freeze_encoder(net.backbone, None if freeze_backbone else freeze_blocks)


def build_model(
    backbone: str = "resnet50",
    *,
    num_classes: int = 19,
    output_stride: int = 16,
    pretrained: str | Path | None = None,
    aux: bool = True,
    proj_heads: bool = True,
    proj_dim: int = 256,
    channels_last: bool = False,
    grad_checkpointing: bool = False,
    proj_levels: Sequence[str] = (),
    vit: dict[str, Any] | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    freeze_backbone: bool = False,
    freeze_blocks: int = 0,
    in_losses: bool = True,
    decode_head: str = "deeplabv3plus",
    mask2former: dict[str, Any] | None = None,
) -> SegNet:
    """Build the BlindNet / DeepLabV3+ network (docs/METHOD.md, "Model").

    backbone: "resnet18/34/50/101" (torchvision, exact IN placement) or "timm:<name>".
    pretrained: local ImageNet state dict for the backbone (.pth/.pt/.safetensors); never downloads.
    aux / proj_heads: build the training-only auxiliary head / the three projection heads.
    channels_last / grad_checkpointing: NHWC weights and activations / recompute the backbone stages
        (ViT: every block) in backward to save memory.
    proj_levels: the three features the projection heads read (PROJ_LEVELS; Mask2Former: the backbone
        levels and M2F_LEVELS); () = the head's default (``default_proj_levels``).
    decode_head: "deeplabv3plus" | "mask2former" (model/mask2former.py; ``mask2former``: its options
        hidden_dim, queries, encoder_layers, decoder_layers, heads, points; with Rein the backbone's
        tokens are the queries).
    vit: plain-ViT options (model/vit.py: blocks, in_points, pyramid_channels, drop_path, patch_size;
        adapter "none" | "rein" | "lora" with the options ``rein`` and ``lora`` of model/adapters.py).
    timm_kwargs: extra timm.create_model arguments (e.g. {"depth": 2}).
    in_losses: the IN outputs feed a loss (CML/CCL); a ViT builds no pyramid level nothing reads.
    freeze_backbone / freeze_blocks: requires_grad=False on the whole encoder / on its stem and first
        k blocks (model/freeze.py); frozen tensors get no optimizer state and no gradient all-reduce.
    """
    check_backbone(backbone)  # a ConfigError naming model.backbone
    proj_levels = tuple(proj_levels) or default_proj_levels(decode_head)
    net = SegNet(
        build_backbone(backbone, output_stride=output_stride, pretrained=pretrained,
                       grad_checkpointing=grad_checkpointing, timm_kwargs=timm_kwargs,
                       vit={**(vit or {}), "consumers": dict(aux=aux, proj_levels=tuple(proj_levels) if proj_heads
                                                             else (), in_losses=in_losses,
                                                             decoder_levels=(0, 1, 2, 3) if decode_head == "mask2former"
                                                             else (0, 3))}),
        num_classes,
        aux=aux, proj_heads=proj_heads, proj_dim=proj_dim, channels_last=channels_last,
        proj_levels=proj_levels, decode_head=decode_head, mask2former=mask2former,
    )
    _freeze(net, (vit or {}).get("adapter", "none"), freeze_backbone, freeze_blocks)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def count_parameters(model: SegNet) -> dict[str, int]:
    """Parameter counts: {"inference": backbone + decoder, "aux": aux head, "proj_heads": all three}."""

    def total(params: Iterator[nn.Parameter] | None) -> int:
        return sum(p.numel() for p in params) if params is not None else 0

    return {
        "inference": total(model.inference_parameters()),
        "aux": total(model.aux_head.parameters() if model.aux_head is not None else None),
        "proj_heads": total(model.proj_heads.parameters() if model.proj_heads is not None else None),
    }
