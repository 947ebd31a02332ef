"""``run.compile``: torch.compile for the training network (docs/GPU_STEP.md, "torch.compile").

What is compiled, in place (the module, its parameters and its state_dict keys stay the same, so
checkpoints, DDP and evaluation see the network they always see):

- the network's forward: one graph per call signature (train with and without the aux head,
  eval), no graph break (bench/compile_step.py counts them with torch._dynamo.explain);
- each projection head's row path (``embed_rows``: the heads at the sampled pixels), with a
  dynamic row count (the number of sampled pixels changes every step).

The losses' sampling stays eager: it is integer index math on data-dependent sizes, and part of
it runs in NumPy on the host (the per-image seeds, the global scopes' metadata).
"""
from __future__ import annotations

import typing

import torch
from torch import nn

from ..config import CompileBackend

BACKENDS: tuple[str, ...] = typing.get_args(CompileBackend)
"""torch.compile backends run.compile_backend may name: inductor (generated kernels: the one that
speeds the step up), aot_eager (the same graph capture and autograd tracing, no code generation:
compiles in seconds, for checks), eager (capture only)."""


def compile_network(net: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile ``net``'s forward and its projection heads' row path in place; returns ``net``."""
    if backend not in BACKENDS:
        raise ValueError(f"run.compile_backend={backend!r} is not one of {BACKENDS}")
    net.compile(backend=backend)
    for head in getattr(net, "proj_heads", None) or []:
        if hasattr(head, "rows"):
            head.rows = torch.compile(head.rows, backend=backend, dynamic=True)
    return net
