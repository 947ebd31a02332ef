"""Layer ids of a backbone's parameters and freezing (docs/METHOD.md, "Recipes").

Every backbone lists its encoder in depth order (``Backbone.layer_groups``): group 0 is the stem /
patch embedding (with a ViT's class, register and position tokens), then one group per block.
A parameter's layer id is the index of its group; parameters in no group (a ViT's pyramid and tap
norm: the neck) get ``len(groups)``, above every block. Layer-wise lr decay (engine/optim.py) and
freezing use these ids.
"""
from __future__ import annotations

from torch import nn

__all__ = ["layer_ids", "freeze_encoder"]


def layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name in ``backbone``: layer id}, number of encoder groups n); the neck has id n."""
    groups = backbone.layer_groups()
    owner: dict[int, int] = {}
    for i, group in enumerate(groups):
        for item in group:
            for p in (item.parameters() if isinstance(item, nn.Module) else [item]):
                owner.setdefault(id(p), i)
    n = len(groups)
    return {name: owner.get(id(p), n) for name, p in backbone.named_parameters()}, n


def freeze_encoder(backbone: nn.Module, blocks: int | None) -> list[str]:
    """requires_grad=False on the encoder (``blocks=None``: every group) or on its stem and first
    ``blocks`` blocks (groups 0..blocks); returns the frozen parameter names. The neck stays trainable.

    The whole encoder (``blocks=None``) is frozen for real: every parameter of its modules
    (``backbone.encoder_modules()``) too, and they stay in eval mode whatever ``train()`` is called
    with (no dropout, no drop-path, BN running statistics unchanged): ``Backbone.train``."""
    ids, n = layer_ids(backbone)
    if blocks is not None and not 0 <= blocks < n:
        raise ValueError(f"model.freeze_blocks: {blocks} must be in [0, {n - 1}] ({n - 1} blocks in this backbone)")
    last = n - 1 if blocks is None else blocks
    inside: set[int] = set()
    if blocks is None:
        modules = list(backbone.encoder_modules())
        inside = {id(p) for m in modules for p in m.parameters()}
        where = {id(m): name for name, m in backbone.named_modules()}
        backbone.frozen_modules = [where[id(m)] for m in modules]  # names: module swaps (SyncBN) keep them
        backbone.train(backbone.training)
    frozen = []
    for name, p in backbone.named_parameters():
        if ids[name] <= last or id(p) in inside:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
