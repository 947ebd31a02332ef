"""Fault injection for the fault-tolerance tests (tests/engine/test_faults.py), from environment
variables read once at set-up; nothing here runs in a training step unless they are set.

The variables (BLINDSEG_FAULT_RANK, _NAN, _EXIT, _HANG, _RAISE, _SETUP) are described in
docs/OPERATIONS.md, "Fault injection for tests"; BLINDSEG_FAULT_SETUP=1 raises a RuntimeError during
set-up, before the model is built (=missing: a FileNotFoundError there).

:func:`install` is the trainer's one call (engine/trainer.py, ``Trainer._setup_run``): it raises
the set-up fault, and only when a step fault is set for this rank it wraps the trainer's
``train_step`` (the attempt faults before the step) and ``_forward`` (the non-finite loss).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping


class Faults:
    """The step faults of this rank (inactive unless their variables are set)."""

    def __init__(self, rank: int, environ: Mapping[str, str] = os.environ) -> None:
        env = environ.get
        on = rank == int(env("BLINDSEG_FAULT_RANK", "0"))
        self.rank = rank
        self.nan = {int(v) for v in env("BLINDSEG_FAULT_NAN", "").split(",") if v.strip()} if on else set()
        self.exit_at = int(env("BLINDSEG_FAULT_EXIT")) if on and env("BLINDSEG_FAULT_EXIT") else None
        self.hang_at = int(env("BLINDSEG_FAULT_HANG")) if on and env("BLINDSEG_FAULT_HANG") else None
        self.raise_at = int(env("BLINDSEG_FAULT_RAISE")) if on and env("BLINDSEG_FAULT_RAISE") else None

    @property
    def active(self) -> bool:
        return bool(self.nan) or any(a is not None for a in (self.exit_at, self.hang_at, self.raise_at))

    def before_step(self, attempt: int) -> None:
        rank = self.rank
        if attempt == self.exit_at:
            print(f"[fault] rank {rank}: exiting abruptly at step attempt {attempt}", flush=True)
            os._exit(17)
        if attempt == self.raise_at:
            raise RuntimeError(f"injected fault: rank {rank} raises at step attempt {attempt}")
        if attempt == self.hang_at:
            print(f"[fault] rank {rank}: hanging at step attempt {attempt}", flush=True)
            while True:
                time.sleep(60)

    def wrap_step(self, trainer: Any) -> Callable[[], bool]:
        """``trainer.train_step`` after the faults of its attempt (``trainer.attempt``: step attempts
        before this one, skipped ones included)."""
        train_step = trainer.train_step

        def step_with_faults() -> bool:
            self.before_step(trainer.attempt)
            return train_step()

        return step_with_faults

    def wrap_forward(self, trainer: Any) -> Callable[..., dict]:
        """``trainer._forward`` whose loss is non-finite at the BLINDSEG_FAULT_NAN attempts."""
        forward = trainer._forward

        def forward_with_faults(*args: Any, **kwargs: Any) -> dict:
            out = forward(*args, **kwargs)
            return {**out, "total": out["total"] * float("nan")} if trainer.attempt in self.nan else out

        return forward_with_faults


def raise_setup_fault(rank: int, environ: Mapping[str, str] = os.environ) -> None:
    """BLINDSEG_FAULT_SETUP on this rank: raise now."""
    what = environ.get("BLINDSEG_FAULT_SETUP")
    if what and rank == int(environ.get("BLINDSEG_FAULT_RANK", "0")):
        error = FileNotFoundError if what == "missing" else RuntimeError
        raise error(f"injected fault: rank {rank} raises during set-up")


def install(trainer: Any) -> Faults | None:
    """Raise the set-up fault; wrap ``trainer.train_step`` and ``trainer._forward`` when a step fault
    is set for its rank. Returns the installed Faults (None: nothing set, nothing wrapped)."""
    raise_setup_fault(trainer.rank)
    faults = Faults(trainer.rank)
    if not faults.active:
        return None
    trainer.train_step = faults.wrap_step(trainer)
    trainer._forward = faults.wrap_forward(trainer)
    return faults
