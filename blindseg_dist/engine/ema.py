"""EMA of the trained weights (``optim.ema_decay``; SoMA's recipe keeps one from iteration 12k on).

After every optimizer step ``s`` (counted from 1): ema = live while s <= optim.ema_start, then
ema = d * ema + (1 - d) * live, over the parameters that train (a frozen backbone has no EMA to keep).
When it is on, evaluation during training and every checkpoint's model.safetensors hold the EMA weights;
the live weights go into the checkpoint's state.pt ("ema_live"), so a resume restores both exactly.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class WeightEMA:
    """The EMA of ``net``'s trainable parameters (module doc)."""

    def __init__(self, net: nn.Module, decay: float, start: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay: {decay} must be in (0, 1)")
        self.decay, self.start = float(decay), int(start)
        self.params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        for n, p in self.params.items():
            if step <= self.start:
                self.shadow[n].copy_(p.detach())
            else:
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    def state_for_checkpoint(self, model_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(model_state with the EMA values of the trained tensors, the live values for state.pt)."""
        live = {n: model_state[n].detach().cpu().clone() for n in self.shadow if n in model_state}
        out = dict(model_state)
        out.update({n: self.shadow[n].detach().cpu() for n in live})
        return out, live

    @torch.no_grad()
    def restore(self, live: dict[str, torch.Tensor] | None) -> None:
        """After the network was loaded from a checkpoint (its EMA weights): those become the EMA and
        ``live`` (state.pt's "ema_live") the weights that train on; None: the EMA starts from them."""
        for n, p in self.params.items():
            self.shadow[n].copy_(p.detach())
            if live is not None and n in live:
                p.copy_(live[n])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The network holds the EMA weights inside the block (evaluation), its live weights after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])
