"""Plain ViT backbones (timm ViT, DeiT, CLIP ViT, DINOv2 with or without registers, EVA-02) with a
simple feature pyramid and BlindNet's IN points (docs/METHOD.md, "ViT backbones").

A plain ViT has one resolution (the patch grid, stride = patch size 14 or 16). ``ViTBackbone``
taps four chosen blocks (``blocks``; default: the last block of each quarter of the depth), turns
their patch tokens into NCHW maps and resamples each to one pyramid level in the ViTDet manner
(transposed 2x2 convs up, max-pool down, then a bilinear resize to the exact level size when the
patch size is not a power of two, e.g. 14), followed by 1x1 conv + LayerNorm + 3x3 conv + LayerNorm
to ``pyramid_channels``. Levels: strides (4, 8, 16, output_stride) with output_stride 16 or 32,
the four outputs of the ``Backbone`` interface (low-level, mid, aux source, high).

Any input size: the patch embedding pads the image to a multiple of the patch size (timm's
``dynamic_img_pad``) and the position embeddings are resampled to the patch grid of every input
(``dynamic_img_size``; EVA-02's rotary embeddings are built for the grid).

BlindNet IN points (``in_points``, three of):
  "embed"      after the patch embedding, before the position embedding; feeds the blocks;
  "block<i>"   on the patch tokens after block i (0-based); feeds block i + 1;
  "p4" | "p8" | "p16" | "p32"   on a pyramid output; feeds the decoder / aux head.
Default ("embed", "p4", "p8"): the earliest features of the token column and the two
highest-resolution pyramid maps, where style (colour, texture) statistics live, as IN sits
at the stem and the first two stages of a ResNet. Every IN is affine-free (``instance_norm``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Backbone, ChannelsLastIN, instance_norm, load_state_dict_file, preview_keys
from .adapters import ADAPTERS, Rein, apply_lora
from .freeze import freeze_encoder

__all__ = ["ViTBackbone", "is_vit", "VIT_FAMILIES", "DEFAULT_IN_POINTS"]

_log = logging.getLogger(__name__)

VIT_FAMILIES: dict[str, str] = {
    "timm.models.vision_transformer": "vit",
    "timm.models.deit": "vit",
    "timm.models.eva": "eva",
}
"""timm modules whose models ``ViTBackbone`` drives (VisionTransformer, Eva)."""

DEFAULT_IN_POINTS: tuple[str, str, str] = ("embed", "p4", "p8")
_LEVEL_NAMES = {4: "p4", 8: "p8", 16: "p16", 32: "p32"}


def is_vit(name: str) -> bool:
    """True when the timm model ``name`` is a plain ViT (VisionTransformer or Eva)."""
    import timm

    if not timm.is_model(name):
        return False
    return timm.models.model_entrypoint(name).__module__ in VIT_FAMILIES


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)


class _PyramidLevel(nn.Module):
    """One ViTDet level: resample the patch-grid map by ``2 ** n_up`` (n_up < 0: max-pool), resize to
    the exact level size, then 1x1 conv + LN + 3x3 conv + LN."""

    def __init__(self, dim: int, n_up: int, out: int) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        layers: list[nn.Module] = []
        c = dim
        for i in range(max(0, n_up)):
            if i:
                layers += [LayerNorm2d(c), nn.GELU()]
            layers.append(_up(c, c // 2))
            c //= 2
        for _ in range(max(0, -n_up)):
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        self.scale = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Conv2d(c, out, 1, bias=False), LayerNorm2d(out),
                                  nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.scale(x)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.proj(x)


def _default_blocks(depth: int) -> list[int]:
    """The last block of each quarter of the depth: 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23]."""
    return [max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)]


class ViTBackbone(Backbone):
    """A timm plain ViT + simple feature pyramid; ``forward(x) -> (feats, in_feats)`` (module doc)."""

    def __init__(
        self,
        name: str,
        output_stride: int = 16,
        pretrained: str | Path | None = None,
        grad_checkpointing: bool = False,
        *,
        blocks: Sequence[int] | None = None,
        in_points: Sequence[str] = DEFAULT_IN_POINTS,
        pyramid_channels: int = 256,
        drop_path: float = 0.0,
        timm_kwargs: dict[str, Any] | None = None,
        consumers: dict[str, Any] | None = None,
        adapter: str = "none",
        rein: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        patch_size: int = 0,
    ) -> None:
        super().__init__()
        import timm

        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32 for the ViT {name!r} (its pyramid's last level), "
                             f"got {output_stride}")
        self.family = VIT_FAMILIES[timm.models.model_entrypoint(name).__module__]
        kwargs = dict(timm_kwargs or {})
        kwargs.update(num_classes=0, dynamic_img_size=True, dynamic_img_pad=True, drop_path_rate=drop_path)
        if patch_size:
            kwargs["patch_size"] = patch_size  # pretrained kernels are resized to it (load_pretrained)
        self.patch_resized = bool(patch_size)
        self.lora_targets: list[str] = []
        vit = timm.create_model(name, pretrained=False, **kwargs)  # weights: load_pretrained, local files only
        self.arch = name
        self._take_vit(vit, blocks)
        self.depth = len(vit.blocks)
        self.embed_dim = vit.embed_dim
        self.patch = int(vit.patch_embed.patch_size[0])
        self.num_prefix = int(vit.num_prefix_tokens)
        self.strides = (4, 8, 16, output_stride)
        self.channels = (pyramid_channels,) * 4
        self.output_stride = output_stride
        self.in_points = tuple(self._check_in_points(in_points))
        self._build_pyramid(pyramid_channels, consumers or {})
        self.grad_checkpointing = grad_checkpointing
        self.pretrained_report: dict[str, Any] | None = None
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self.adapter = adapter
        self.rein: Rein | None = None
        if adapter != "none":
            self._attach_adapter(adapter, rein or {}, lora or {})

    def _take_vit(self, vit: nn.Module, blocks: Sequence[int] | None) -> None:
        """Keep the timm ``vit`` as ``self.vit`` with what the pyramid needs: the tapped blocks
        (model.vit_blocks, checked), the final norm as ``tap_norm``; classifier pieces and the
        blocks after the last tap removed."""
        name = self.arch
        depth = len(vit.blocks)
        taps = list(blocks) if blocks else _default_blocks(depth)
        if len(taps) != 4 or any(not 0 <= b < depth for b in taps) or sorted(taps) != taps:
            raise ValueError(f"model.vit_blocks: {taps!r} must be 4 increasing block indices in [0, {depth - 1}] "
                             f"({name} has {depth} blocks)")
        self.taps = taps
        # The final norm normalizes every tapped block's tokens (timm's forward_intermediates(norm=True));
        # EVA-02 keeps its LayerNorm in fc_norm (norm is Identity). Classifier pieces are dropped, and
        # blocks after the last tap are never run: no parameter goes unused (DDP).
        self.tap_norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
        vit.norm, vit.fc_norm, vit.head_drop, vit.head = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        if getattr(vit, "attn_pool", None) is not None:
            vit.attn_pool = None
        if taps[-1] < depth - 1:
            _log.info("%s: blocks %d..%d come after the last tapped block and are dropped", name, taps[-1] + 1, depth - 1)
            vit.blocks = vit.blocks[: taps[-1] + 1]
        # The column runs inside vit's own __call__ (its forward is replaced by _call_inside), so module
        # hooks see vit's direct parameters (position embedding, class / register tokens) in use:
        # DeepSpeed ZeRO-3 gathers a module's parameters in its forward pre-hook.
        vit.forward = _call_inside
        self.vit = vit

    def _build_pyramid(self, pyramid_channels: int, consumers: dict[str, Any]) -> None:
        """The pyramid levels something reads, and the IN layers of ``self.in_points``."""
        # A level nothing reads is not built (its parameters would get no gradient: DDP stops). The
        # decoder reads levels 0 and 3; ``consumers`` says what else the network uses (build_model).
        used = self.used_levels(**consumers)
        self.levels = nn.ModuleList(
            _PyramidLevel(self.embed_dim, round(math.log2(self.patch / s)), pyramid_channels) if i in used
            else nn.Identity() for i, s in enumerate(self.strides)
        )
        self.built = tuple(i in used for i in range(4))
        self.in_channels = tuple(self.embed_dim if not p.startswith("p") else pyramid_channels for p in self.in_points)
        self.in_norms = nn.ModuleList(
            ChannelsLastIN(c) if not p.startswith("p") else instance_norm(c) for p, c in zip(self.in_points, self.in_channels)
        )
    def _attach_adapter(self, adapter: str, rein: dict[str, Any], lora: dict[str, Any]) -> None:
        """Freeze the encoder for real (model/freeze.py: no gradient, eval mode) and add the adapter
        (model/adapters.py), after the pretrained weights are in (LoRA's SVD init reads them)."""
        if adapter not in ADAPTERS:
            raise ValueError(f"model.adapter: {adapter!r} is not one of {list(ADAPTERS)}")
        freeze_encoder(self, None)
        if adapter == "rein":
            self.rein = Rein(self.depth, self.embed_dim, self.patch, **rein)
        else:
            opts = dict(lora)
            span = opts.pop("blocks", None)
            if span:
                if len(span) != 2 or not 0 <= span[0] <= span[1] < self.depth:
                    raise ValueError(f"model.lora_blocks: {list(span)} must be [first, last] with 0 <= first <= last "
                                     f"< {self.depth} ({self.arch} runs {self.depth} blocks)")
                span = range(span[0], span[1] + 1)
            if opts.get("targets") is None:
                opts.pop("targets", None)
            self.lora_targets = apply_lora(self.vit, blocks=span, **opts)

    def used_levels(self, aux: bool = True, proj_levels: Sequence[str] = ("low", "mid", "aux", "high"),
                    in_losses: bool = True, decoder_levels: Sequence[int] = (0, 3)) -> set[int]:
        """Pyramid levels read by the decoder (DeepLabV3+: 0, 3; Mask2Former: all four), the aux head
        (2), projection heads on backbone outputs, and, when ``in_losses`` (CML/CCL on), the levels
        carrying an IN point."""
        used = set(decoder_levels) | ({2} if aux else set())
        used |= {("low", "mid", "aux", "high").index(p) for p in proj_levels if p in ("low", "mid", "aux", "high")}
        if in_losses:
            names = [_LEVEL_NAMES[s] for s in self.strides]
            used |= {names.index(p) for p in self.in_points if p in names}
        return used

    def _check_in_points(self, points: Sequence[str]) -> list[str]:
        allowed = ["embed", *(f"block{i}" for i in range(self.depth)), *(_LEVEL_NAMES[s] for s in self.strides)]
        points = list(points)
        if len(points) != 3 or len(set(points)) != 3 or any(p not in allowed for p in points):
            raise ValueError(f"model.vit_in_points: {points!r} must be 3 distinct points among embed, block0.."
                             f"block{self.depth - 1}, {', '.join(_LEVEL_NAMES[s] for s in self.strides)}")
        return points

    # ---- forward --------------------------------------------------------------------------
    def _block(self, i: int, x: Tensor, rope: Tensor | None) -> Tensor:
        blk = self.vit.blocks[i]
        fn = blk if self.family == "vit" else (lambda t: blk(t, rope=rope))
        return self._stage(fn, x, blk)  # checkpointed per block when grad_checkpointing

    def _grid(self, tokens: Tensor, hw: tuple[int, int]) -> Tensor:
        """Patch tokens (B, N, C) without the prefix tokens -> NHWC (B, h, w, C)."""
        return tokens[:, self.num_prefix:].reshape(tokens.shape[0], hw[0], hw[1], -1)

    def column(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        """The token column: the four tapped blocks' normalized patch tokens as NCHW maps on the
        patch grid, and the IN outputs recorded on the way (embed / block<i>)."""
        return self.vit(self._column, x)

    def _column(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        vit = self.vit
        recorded: dict[str, Tensor] = {}
        t = vit.patch_embed(x)  # NHWC, padded to a multiple of the patch size
        hw = (t.shape[1], t.shape[2])
        if "embed" in self.in_points:
            t = self.in_norms[self.in_points.index("embed")](t)
            recorded["embed"] = t.permute(0, 3, 1, 2)
        if self.family == "vit":
            t, rope = vit.patch_drop(vit._pos_embed(t)), None  # position embeddings resampled to hw
        else:
            t, rope = vit._pos_embed(t)  # EVA: also the rotary embeddings for this grid
        t = vit.norm_pre(t)
        maps: list[Tensor] = []
        for i in range(self.depth):
            t = self._block(i, t, rope)
            if self.rein is not None:
                t = self.rein(t, i, self.num_prefix)  # refines the patch tokens; prefix tokens pass through
            name = f"block{i}"
            if name in self.in_points:
                g = self.in_norms[self.in_points.index(name)](self._grid(t, hw))
                recorded[name] = g.permute(0, 3, 1, 2)
                t = torch.cat([t[:, : self.num_prefix], g.reshape(t.shape[0], -1, t.shape[-1])], dim=1)
            if i in self.taps:
                maps.extend([self._grid(self.tap_norm(t), hw).permute(0, 3, 1, 2)] * self.taps.count(i))
        return maps, recorded

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        size = tuple(x.shape[-2:])
        maps, recorded = self.column(x)
        feats: list[Tensor | None] = []
        for level, (stride, m) in enumerate(zip(self.strides, maps)):
            if not self.built[level]:
                feats.append(None)  # read by nothing (see __init__)
                continue
            f = self.levels[level](m, (math.ceil(size[0] / stride), math.ceil(size[1] / stride)))
            name = _LEVEL_NAMES[stride]
            if name in self.in_points and name not in recorded:
                f = self.in_norms[self.in_points.index(name)](f)
                recorded[name] = f
            feats.append(f)
        return feats, [recorded.get(p) for p in self.in_points]

    # ---- layer ids (layer-wise lr decay, freezing) --------------------------------------------
    def encoder_modules(self) -> list[nn.Module]:
        """The whole timm ViT (patch embedding, tokens, blocks, pre-norm); the tap norm and the
        pyramid are the neck and Rein is outside it."""
        return [self.vit]

    def adapter_modules(self) -> list[nn.Module]:
        from .adapters import lora_adapter_modules

        return lora_adapter_modules(self.vit) if self.lora_targets else []

    def tokens(self) -> Tensor | None:
        """Rein's learnable tokens [L, T, C] (``model.adapter: rein``), else None."""
        return self.rein.tokens() if self.rein is not None else None

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """Encoder parameters in depth order: [patch embedding + tokens + position embedding], block 0,
        ...; the pyramid and the tap norm come after (the neck, see engine/optim.py)."""
        vit = self.vit
        first: list[nn.Module | nn.Parameter] = [vit.patch_embed]
        for attr in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            p = getattr(vit, attr, None)
            if isinstance(p, nn.Parameter):
                first.append(p)
        return [first, *([blk] for blk in vit.blocks)]

    # ---- weights from a local file -----------------------------------------------------------
    def load_pretrained(self, path: str | Path) -> dict[str, Any]:
        """Load a timm / original (DINOv2, EVA, CLIP, ...) state dict of this ViT from a local
        .pth/.pt/.safetensors file (never downloads). timm's checkpoint filter converts original
        layouts and resamples the position embeddings to this model's grid. Common wrapper prefixes
        ("module.", "model.", "backbone.", "encoder.") are stripped. Returns (and logs) the report
        {"loaded", "missing", "unexpected", "skipped"}, also kept as ``self.pretrained_report``."""
        import timm.models.eva as eva
        import timm.models.vision_transformer as vt

        if self.lora_targets:
            raise RuntimeError("load_pretrained after the LoRA layers were injected: build the backbone with "
                               "pretrained=... (the weights load first)")
        state = load_state_dict_file(path)
        state = _unwrap(state)
        if self.patch_resized:
            state = resize_patch_embedding(state, self.vit)
        filt = vt.checkpoint_filter_fn if self.family == "vit" else eva.checkpoint_filter_fn
        state = filt(state, self.vit)
        own = self.vit.state_dict()
        skipped = sorted(k for k in state if k.startswith(("head.", "fc_norm.", "norm.", "attn_pool.")) and k not in own)
        # the final norm lives on as tap_norm
        norm_key = "norm." if self.tap_norm is not None and any(k.startswith("norm.") for k in state) else "fc_norm."
        tap_own = {f"tap_norm.{k}": v for k, v in self.tap_norm.state_dict().items()}
        tap_state = {f"tap_norm.{k[len(norm_key):]}": v for k, v in state.items() if k.startswith(norm_key)}
        skipped = [k for k in skipped if not k.startswith(norm_key)]
        unexpected = sorted(k for k in state if k not in own and k not in skipped and not k.startswith(norm_key))
        missing = sorted(k for k in own if k not in state) + sorted(k for k in tap_own if k not in tap_state)
        matched = [k for k in own if k in state]
        if not matched:
            raise ValueError(f"{path}: no key matches the ViT {self.arch} (first keys: {list(state)[:3]}); "
                             "expected timm names like 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'")
        bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
               for k in matched if state[k].shape != own[k].shape]
        bad += [f"{k}: file {tuple(tap_state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in tap_own.items() if k in tap_state and tap_state[k].shape != v.shape]
        if bad:
            raise ValueError(f"{path}: shape mismatch (another ViT size?): " + "; ".join(bad[:5]))
        self.vit.load_state_dict({k: state[k] for k in matched}, strict=False)
        if tap_state:
            self.tap_norm.load_state_dict({k[len("tap_norm."):]: v for k, v in tap_state.items() if k in tap_own})
        report = {"file": str(path), "arch": self.arch, "loaded": len(matched) + len(tap_state), "missing": missing,
                  "unexpected": unexpected, "skipped": skipped, "level": "info" if not missing else "warning",
                  "message": f"{path} ({self.arch})"}
        _log.info("pretrained %s: loaded %d tensors", path, report["loaded"])
        if missing or unexpected:
            _log.warning("%s: %d missing keys (left at random init): %s; %d unexpected keys (ignored): %s",
                         path, len(missing), preview_keys(missing), len(unexpected), preview_keys(unexpected))
        self.pretrained_report = report
        return report


def resize_patch_embedding(state: dict[str, Tensor], vit: nn.Module) -> dict[str, Tensor]:
    """A ViT state dict at another patch size for ``vit`` (``model.patch_size``, as Rein converts
    DINOv2 from 14 to 16): the patch-embedding kernel resized bicubically (F.interpolate,
    align_corners=False) to vit's patch size, and the position embeddings of the patch grid resampled
    bicubically to vit's grid (the prefix tokens' kept as they are). Other keys are untouched."""
    state = dict(state)
    w = state.get("patch_embed.proj.weight")
    size = tuple(vit.patch_embed.proj.weight.shape[-2:])
    if w is not None and w.ndim == 4 and tuple(w.shape[-2:]) != size:
        state["patch_embed.proj.weight"] = F.interpolate(w.float(), size=size, mode="bicubic",
                                                         align_corners=False).to(w.dtype)
    pe, own = state.get("pos_embed"), getattr(vit, "pos_embed", None)
    if pe is not None and isinstance(own, Tensor) and pe.shape[1] != own.shape[1]:
        gh, gw = vit.patch_embed.grid_size
        prefix = own.shape[1] - gh * gw
        old = math.isqrt(pe.shape[1] - prefix)
        if old * old != pe.shape[1] - prefix:
            raise ValueError(f"pos_embed of {pe.shape[1]} tokens is not {prefix} prefix tokens + a square grid")
        grid = pe[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        state["pos_embed"] = torch.cat([pe[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pe.dtype)],
                                       dim=1)
    return state


def _call_inside(fn, *args):
    """The forward of the wrapped timm ViT: run ``fn(*args)`` inside its module call (see __init__)."""
    return fn(*args)


_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def _unwrap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip one common wrapper prefix shared by every key (DDP "module.", "backbone.", ...)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state

