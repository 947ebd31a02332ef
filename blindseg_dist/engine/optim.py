"""The optimizer and its learning-rate schedule, built in one place (docs/METHOD.md, "Recipe").

`build_optimizer` is called once by the trainer, before `accelerator.prepare`. The schedule is
ours (never prepared by Accelerate, never DeepSpeed's): the trainer steps it exactly once per
optimizer step, on every engine.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Config


def poly_lambda(max_steps: int, power: float) -> Callable[[int], float]:
    """The poly factor (1 - step / max_steps) ** power, 0 from max_steps on; no warm-up."""
    return lambda step: max(0.0, 1.0 - step / max_steps) ** power


def build_optimizer(cfg: Config, module: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(optimizer, scheduler) for every parameter of ``module``: SGD with momentum and weight decay
    (optim.lr, optim.momentum, optim.weight_decay; one parameter group) and poly decay
    (optim.poly_power over optim.max_steps)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.optim.max_steps, cfg.optim.poly_power))
    return optimizer, scheduler
