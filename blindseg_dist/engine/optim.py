"""The optimizer and its learning-rate schedule, built in one place (docs/METHOD.md, "Recipe",
"Recipes for large backbones").

`build_optimizer` is called once by the trainer, before `accelerator.prepare`. The schedule is
ours (never prepared by Accelerate, never DeepSpeed's): the trainer steps it exactly once per
optimizer step, on every engine.

Parameter groups: only parameters with ``requires_grad`` (frozen ones get no optimizer state;
DDP and DeepSpeed do not reduce their gradients either). Each group has one lr scale and one
weight decay:
- lr scale: an encoder parameter of layer id i (model/freeze.py: 0 = stem / patch embedding,
  1.. = blocks, n groups) gets ``layer_decay ** (n - i)``; everything else (decoder, aux and
  projection heads, a ViT's pyramid) gets ``head_lr_mult``;
- weight decay 0 for the kinds in ``optim.no_weight_decay`` (norm: 1-D weights; bias; pos_embed:
  position embeddings, class / register tokens, relative position tables).
With the defaults (layer_decay 1, head_lr_mult 1, no exclusions) this is one group of every
parameter: the BlindNet recipe (SGD 0.01, momentum 0.9, weight decay 5e-4, poly 0.9).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, OptimConfig
from ..model.freeze import layer_ids

POS_EMBED_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "relative_position_bias_table",
                   "absolute_pos_embed", "rel_pos")
"""Name parts of the ``pos_embed`` weight-decay exclusion."""


def poly_lambda(max_steps: int, power: float) -> Callable[[int], float]:
    """The poly factor (1 - step / max_steps) ** power, 0 from max_steps on; no warm-up."""
    return lambda step: max(0.0, 1.0 - step / max_steps) ** power


def lr_lambda(o: OptimConfig) -> Callable[[int], float]:
    """The lr factor at optimizer step ``step``: decay(step) (poly or cosine over max_steps, from 1
    to min_lr_ratio) times, during the first warmup_steps, the linear warm-up
    warmup_ratio + (1 - warmup_ratio) * step / warmup_steps."""
    lo = o.min_lr_ratio

    def decay(step: int) -> float:
        t = min(step, o.max_steps) / o.max_steps
        f = (1.0 - t) ** o.poly_power if o.schedule == "poly" else 0.5 * (1.0 + math.cos(math.pi * t))
        return lo + (1.0 - lo) * f

    def factor(step: int) -> float:
        f = decay(step)
        if step < o.warmup_steps:
            f *= o.warmup_ratio + (1.0 - o.warmup_ratio) * step / o.warmup_steps
        return f

    return factor


def _no_decay(name: str, p: nn.Parameter, kinds: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if "bias" in kinds and leaf == "bias":
        return True
    if "pos_embed" in kinds and any(part in name for part in POS_EMBED_NAMES):
        return True
    return "norm" in kinds and p.ndim <= 1 and leaf != "bias"


def _encoder(module: nn.Module) -> tuple[str, dict[str, int], int] | None:
    """(name prefix of the backbone in ``module``, its layer ids, n groups), or None without one."""
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1] == "backbone" and hasattr(sub, "layer_groups"):
            try:
                ids, n = layer_ids(sub)
            except NotImplementedError:
                return None
            return f"{name}.", ids, n
    return None


def param_groups(o: OptimConfig, module: nn.Module) -> list[dict[str, Any]]:
    """The parameter groups of the trainable parameters of ``module`` (module doc), in a fixed order
    (identical on every rank). Each group: params, lr, weight_decay, lr_scale, name."""
    enc = _encoder(module) if (o.layer_decay != 1.0 or o.head_lr_mult != 1.0) else None
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale, where = 1.0, "all"
        if enc is not None:
            prefix, ids, n = enc
            i = ids.get(name[len(prefix):], n) if name.startswith(prefix) else n
            scale, where = (o.layer_decay ** (n - i), f"layer{i}") if i < n else (o.head_lr_mult, "head")
        decay = not _no_decay(name, p, o.no_weight_decay)
        g = groups.setdefault((scale, decay), {
            "params": [], "lr": o.lr * scale, "weight_decay": o.weight_decay if decay else 0.0, "lr_scale": scale,
            "name": f"{where}{'' if decay else '/no_decay'}"})
        g["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameter: model.freeze_backbone / model.freeze_blocks froze everything")
    return list(groups.values())


def build_optimizer(cfg: Config, module: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(optimizer, scheduler) for the trainable parameters of ``module``: optim.optimizer sgd
    (momentum) or adamw (betas), the parameter groups of ``param_groups`` and the schedule of
    ``lr_lambda`` (warm-up, poly or cosine), one LambdaLR factor shared by every group."""
    o = cfg.optim
    groups = param_groups(o, module)
    if o.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                                                           weight_decay=o.weight_decay)
    elif o.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    else:  # config.validate refuses it first
        raise ValueError(f"optim.optimizer {o.optimizer!r}: sgd or adamw")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
    return optimizer, scheduler
