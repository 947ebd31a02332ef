"""Fault injection for the fault-tolerance tests (tests/engine/test_faults.py), from environment
variables read once at set-up; nothing here runs in a training step unless they are set.

BLINDSEG_FAULT_RANK (default 0) is the rank they act on; BLINDSEG_FAULT_NAN="1,3" makes the loss
non-finite at those step attempts (0-based, skipped attempts count); BLINDSEG_FAULT_EXIT=k ends
the process with os._exit(17) at attempt k; BLINDSEG_FAULT_HANG=k makes it sleep forever there;
BLINDSEG_FAULT_RAISE=k raises a RuntimeError there (an error of that rank's own work);
BLINDSEG_FAULT_SETUP=1 raises a RuntimeError during set-up, before the model is built
(BLINDSEG_FAULT_SETUP=missing: a FileNotFoundError there).

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
        self.attempt = 0  # step attempts started so far (skipped ones count)

    @property
    def active(self) -> bool:
        return bool(self.nan) or any(a is not None for a in (self.exit_at, self.hang_at, self.raise_at))

    def before_step(self) -> None:
        attempt, rank = self.attempt, self.rank
        if attempt == self.exit_at:
            print(f"[fault] rank {rank}: exiting abruptly at step attempt {attempt}", flush=True)
            os._exit(17)
        if attempt == self.raise_at:
            raise RuntimeError(f"injected fault: rank {rank} raises at step attempt {attempt}")
        if attempt == self.hang_at:
            print(f"[fault] rank {rank}: hanging at step attempt {attempt}", flush=True)
            while True:
                time.sleep(60)

    def wrap_step(self, train_step: Callable[[], bool]) -> Callable[[], bool]:
        def step_with_faults() -> bool:
            self.before_step()
            try:
                return train_step()
            finally:
                self.attempt += 1

        return step_with_faults

    def wrap_forward(self, forward: Callable[..., dict]) -> Callable[..., dict]:
        def forward_with_faults(*args: Any, **kwargs: Any) -> dict:
            out = forward(*args, **kwargs)
            return {**out, "total": out["total"] * float("nan")} if self.attempt in self.nan else out

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
    trainer.train_step = faults.wrap_step(trainer.train_step)
    trainer._forward = faults.wrap_forward(trainer._forward)
    return faults
