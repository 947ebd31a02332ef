"""Adapters for a frozen plain ViT (docs/ADAPTERS.md): Rein and LoRA (through Hugging Face peft).

``model.adapter``:
  none   the encoder trains (or is frozen with ``model.freeze_backbone``);
  rein   the encoder is frozen; a ``Rein`` layer refines the patch tokens after every block;
  lora   the encoder is frozen; low-rank adapters (peft) sit on the chosen linear layers of a block range.

Rein (one layer per block i, patch tokens f [B, N, C] of block i's output, that layer's tokens
t = A_i @ B_i [T, C]):
    attn  = softmax(f t^T / sqrt(C)) over the T tokens        [B, N, T]
    delta = attn[..., 1:] @ mlp_token(t[1:])                    (token 0: a null slot, dropped after the softmax)
    out   = f + s * mlp_delta(delta + f)
``mlp_token`` and ``mlp_delta`` are C x C linear layers shared by every layer, ``s`` one learnable
scalar (init 1e-3). Class and register tokens pass through untouched. The tokens are low-rank
factors A [L, T, r], B [L, r, C], both uniform in +-sqrt(6 / (3 p^2 + sqrt(C r))) with p the patch
size (r = 0: full tokens [L, T, C], +-sqrt(6 / (3 p^2 + C))). ``tokens()`` gives all of them, [L, T, C],
for a query-based head.

LoRA: ``apply_lora`` injects peft LoRA layers into the ViT's linear layers whose timm name matches
``blocks\\.<i>\\.(<targets>)`` for i in the block range. ``init="svd_minor"`` starts each adapter from the
r smallest singular components of its weight (the frozen weight keeps the rest, so the layer's
output is unchanged), peft's "pissa" from the r largest; ``True``: peft's default (B = 0).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ADAPTERS", "Rein", "apply_lora", "lora_target_regex", "DEFAULT_LORA_TARGETS", "LORA_INITS",
           "trainable_summary"]

ADAPTERS: tuple[str, ...] = ("none", "rein", "lora")
"""Values of model.adapter."""

DEFAULT_LORA_TARGETS = r"attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2)"
"""Linear layers of a block that get an adapter, as a regex over the timm name inside the block:
fused qkv (ViT, DINOv2, DINOv3) or q/k/v_proj (EVA-02), the attention output proj and the MLP (fc1/fc2;
EVA-02's SwiGLU fc1_g/fc1_x/fc2). Anchored to ``blocks.<i>.``, so patch_embed.proj never matches."""

LORA_INITS: tuple[str, ...] = ("default", "svd_minor", "pissa", "gaussian")
"""Values of model.lora_init: peft's default (B = 0), SoMA's minor singular components, peft's PiSSA
(major components), peft's gaussian."""


class Rein(nn.Module):
    """The Rein layers of an L-block ViT of width C (module doc); ``forward(x, layer, num_prefix)``."""

    def __init__(self, num_layers: int, dim: int, patch_size: int, *, num_tokens: int = 100, rank: int = 16,
                 scale_init: float = 1e-3) -> None:
        super().__init__()
        if num_tokens < 2:
            raise ValueError(f"model.rein_tokens: {num_tokens} must be >= 2 (token 0 is the null slot)")
        if rank < 0:
            raise ValueError(f"model.rein_rank: {rank} must be >= 0 (0: full-rank tokens)")
        self.num_layers, self.dim, self.num_tokens, self.rank = num_layers, dim, num_tokens, rank
        if rank:
            self.tokens_a = nn.Parameter(torch.empty(num_layers, num_tokens, rank))
            self.tokens_b = nn.Parameter(torch.empty(num_layers, rank, dim))
            bound = math.sqrt(6.0 / (3 * patch_size ** 2 + math.sqrt(dim * rank)))
            nn.init.uniform_(self.tokens_a, -bound, bound)
            nn.init.uniform_(self.tokens_b, -bound, bound)
        else:
            self.tokens_full = nn.Parameter(torch.empty(num_layers, num_tokens, dim))
            bound = math.sqrt(6.0 / (3 * patch_size ** 2 + dim))
            nn.init.uniform_(self.tokens_full, -bound, bound)
        self.init_bound = bound
        self.mlp_token = nn.Linear(dim, dim)  # nn.Linear's own init: kaiming_uniform(a=sqrt(5)), as released
        self.mlp_delta = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def tokens(self, layer: int | None = None) -> Tensor:
        """The learnable tokens: all layers [L, T, C] (``layer`` None) or one layer's [T, C]."""
        if self.rank:
            if layer is None:
                return self.tokens_a @ self.tokens_b
            return self.tokens_a[layer] @ self.tokens_b[layer]
        return self.tokens_full if layer is None else self.tokens_full[layer]

    def delta(self, feats: Tensor, layer: int) -> Tensor:
        """mlp_delta(attn[..., 1:] @ mlp_token(t[1:]) + f) for patch tokens ``feats`` [B, N, C] (not scaled)."""
        t = self.tokens(layer).to(feats.dtype)
        attn = F.softmax(feats @ t.t() * self.dim ** -0.5, dim=-1)
        return self.mlp_delta(attn[..., 1:] @ self.mlp_token(t[1:]) + feats)

    def forward(self, x: Tensor, layer: int, num_prefix: int = 0) -> Tensor:
        """Block ``layer``'s output x [B, num_prefix + N, C] -> the same with its patch tokens refined."""
        prefix, feats = x[:, :num_prefix], x[:, num_prefix:]
        feats = feats + self.scale.to(feats.dtype) * self.delta(feats, layer)
        return torch.cat([prefix, feats], dim=1) if num_prefix else feats

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, dim={self.dim}, tokens={self.num_tokens}, rank={self.rank}"


def lora_target_regex(blocks: Sequence[int], targets: str = DEFAULT_LORA_TARGETS) -> str:
    """The peft ``target_modules`` regex (matched in full against module names) for ``blocks``."""
    ids = "|".join(str(int(b)) for b in sorted(set(blocks)))
    return rf"blocks\.({ids})\.({targets})"


def apply_lora(vit: nn.Module, *, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
               blocks: Sequence[int] | None = None, targets: str = DEFAULT_LORA_TARGETS, init: str = "default",
               train_bias: bool = False) -> list[str]:
    """Inject peft LoRA layers into the timm ViT ``vit`` in place (module doc); returns the adapted
    module names. Every parameter of ``vit`` but the adapters (and, with ``train_bias``, the adapted
    layers' biases) gets requires_grad=False."""
    from peft import LoraConfig, inject_adapter_in_model

    depth = len(vit.blocks)
    blocks = list(range(depth)) if blocks is None else list(blocks)
    if not blocks or any(not 0 <= b < depth for b in blocks):
        raise ValueError(f"model.lora_blocks: {blocks} must be block indices in [0, {depth - 1}] ({depth} blocks run)")
    if init not in LORA_INITS:
        raise ValueError(f"model.lora_init: {init!r} is not one of {list(LORA_INITS)}")
    if rank < 1:
        raise ValueError(f"model.lora_rank: {rank} must be >= 1")
    regex = lora_target_regex(blocks, targets)
    names = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    missing = [b for b in blocks if not any(n.startswith(f"blocks.{b}.") for n in names)]
    if missing:
        inside = sorted({n.split(".", 2)[2] for n, m in vit.named_modules()
                         if n.startswith(f"blocks.{missing[0]}.") and isinstance(m, nn.Linear)})
        raise ValueError(f"model.lora_targets: {targets!r} matches no linear layer of block(s) {missing}; "
                         f"that block's linear layers are {inside}")
    peft_init: Any = {"default": True, "svd_minor": True, "pissa": "pissa", "gaussian": "gaussian"}[init]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex,
                        init_lora_weights=peft_init, bias="lora_only" if train_bias else "none")
    for p in vit.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, vit)
    if init == "svd_minor":
        for layer in lora_layers(vit):
            _svd_minor_init(layer)
    for n, p in vit.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n
                         or (train_bias and n.endswith("base_layer.bias") and _adapted(n, names)))
    return names


def _adapted(param_name: str, names: list[str]) -> bool:
    return param_name.rsplit(".base_layer.", 1)[0] in names


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside ``module``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def lora_adapter_modules(module: nn.Module) -> list[nn.Module]:
    """The trainable parts of the LoRA layers in ``module``: lora_A, lora_B and lora_dropout."""
    return [d for layer in lora_layers(module) for d in (layer.lora_A, layer.lora_B, layer.lora_dropout)]


@torch.no_grad()
def _svd_minor_init(layer: nn.Module, adapter: str = "default") -> None:
    """SoMA's init of one peft LoRA layer: W = U S V^T (full SVD); the adapter starts from the r smallest
    components (B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T with s the LoRA scaling, so s B A =
    U_r S_r V_r^T) and the frozen weight keeps W - s B A. The layer computes the same function."""
    base = layer.get_base_layer()
    r, s = layer.r[adapter], layer.scaling[adapter]
    w = base.weight.data
    u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
    ur, sr, vhr = u[:, -r:], sv[-r:] / s, vh[-r:]
    a = torch.sqrt(sr)[:, None] * vhr
    b = ur * torch.sqrt(sr)[None, :]
    layer.lora_A[adapter].weight.data = a.to(w.dtype).contiguous()
    layer.lora_B[adapter].weight.data = b.to(w.dtype).contiguous()
    base.weight.data = (w.float() - s * b @ a).to(w.dtype)


def trainable_summary(module: nn.Module) -> dict[str, int]:
    """{"trainable_params", "total_params"} of ``module``."""
    params = list(module.parameters())
    return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params)}
