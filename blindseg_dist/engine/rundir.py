"""Where a training run writes, and what a run may do to a folder that already holds one.

- ``run.output_dir`` null (the default) and no ``--output-dir``: ``runs/<run.name>/<UTC timestamp>/``
  (``run.name`` defaults to the config file's name), so two runs never share a folder.
- A folder that holds checkpoints belongs to a run: training into it without ``--resume`` stops
  with a config error (exit 2) before anything is written.
- ``--resume`` alone: the latest checkpoint of the run folder (with ``run.output_dir`` null: of the
  newest run under ``runs/<run.name>/`` that has one). ``--resume PATH``: that checkpoint folder,
  or the latest checkpoint of that run folder. Resuming from a checkpoint that is not the latest
  of its folder would write over the later ones: it stops (branch into a new ``--output-dir``).
- A resume whose target step (``optim.max_steps``) is at or below the checkpoint's step stops and
  touches nothing. A resume that changes the world size, the batch or the schedule
  (``RESUME_KEYS``) says which and stops, unless those keys are named in ``--allow-changed``.
- Every checkpoint carries the id of the run that wrote it (checkpoints/<step>/meta.json); a run
  deletes (``run.keep_last``) and replaces only checkpoints with its own id. A resume in place
  continues the run (same id); a new run or a branch gets a new id.

docs/INTERFACES.md, "Run folders", states these rules.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..config import Config, ConfigError, get_value, load_config
from . import checkpoint as ckpt

RESUME_KEYS = ("world_size", "data.batch_size", "optim.grad_accum", "optim.lr", "optim.poly_power",
               "optim.max_steps")
"""What a resume may not change without ``--allow-changed``: the global batch and the LR schedule."""


@dataclass
class RunPlan:
    """The resolved run folder, the checkpoint to resume from (None: step 0) and the run id."""
    out_dir: Path
    resume_from: Path | None
    run_id: str


def new_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>/<YYYYmmdd-HHMMSS>`` (UTC), with ``-2``, ``-3``... when that folder exists."""
    base = Path(root) / name / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def find_resume_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from ``--resume PATH``: the folder itself, or a run folder's latest."""
    p = Path(path)
    if (p / ckpt.STATE_FILE).is_file():
        return p
    if p.is_dir() and ckpt.latest_checkpoint(p) is not None:
        return ckpt.latest_checkpoint(p)
    raise ConfigError(f"--resume {str(p)!r}: neither a checkpoint folder (RUN/checkpoints/<step> with "
                      f"{ckpt.STATE_FILE}) nor a run folder with checkpoints")


def _latest_run(name: str, root: str | Path = "runs") -> Path | None:
    """The newest run folder under runs/<name>/ holding a checkpoint."""
    runs = sorted((d for d in (Path(root) / name).glob("*") if d.is_dir()), key=lambda d: d.name)
    return next((d for d in reversed(runs) if ckpt.latest_checkpoint(d) is not None), None)


def plan_run(cfg: Config, resume: bool | str, world: int, allow_changed: tuple[str, ...] = ()) -> RunPlan:
    """Resolve the run folder and the resume checkpoint, and apply the refusals of the module
    docstring (ConfigError, nothing written). Sets ``cfg.run.output_dir``. Collective when
    ``run.output_dir`` is null (rank 0's timestamp is used on every rank)."""
    unknown = sorted(set(allow_changed) - set(RESUME_KEYS))
    if unknown:
        raise ConfigError(f"--allow-changed {unknown}: not a resume key; choose from {list(RESUME_KEYS)}")
    given = cfg.run.output_dir
    src = find_resume_checkpoint(resume) if isinstance(resume, str) else None
    if given is None:
        if src is not None:
            out = src.parent.parent
        else:
            out = (_latest_run(cfg.run.name) if resume else None) or dist.broadcast_object(new_run_dir(cfg.run.name))
    else:
        out = Path(given)
    if src is None and resume:
        src = ckpt.latest_checkpoint(out)
    _check_folder(out, src, resume)
    cfg.run.output_dir = str(out)
    if src is None:
        return RunPlan(out, None, dist.broadcast_object(uuid.uuid4().hex))
    meta = checkpoint_meta(src)
    _check_resume(cfg, src, meta, world, allow_changed)
    in_place = src.parent.parent.resolve() == out.resolve()
    run_id = meta.get("run_id") if in_place and meta.get("run_id") else dist.broadcast_object(uuid.uuid4().hex)
    return RunPlan(out, src, run_id)


def _check_folder(out: Path, src: Path | None, resume: bool | str) -> None:
    """Refuse to mix two runs in ``out`` (see the module docstring)."""
    have = ckpt.list_checkpoints(out)
    steps = ", ".join(p.name for p in have)
    if have and not resume:
        raise ConfigError(f"{out} already holds checkpoints of a run (steps {steps}); continue it with --resume, "
                          f"or train into a new folder (--output-dir, or leave run.output_dir unset for "
                          f"runs/<name>/<timestamp>)")
    if src is None or not have:
        return
    if src.parent.parent.resolve() != out.resolve():
        raise ConfigError(f"--resume {src}: the output folder {out} holds checkpoints of another run (steps {steps}); "
                          "branch into an empty --output-dir")
    if int(src.name) < int(have[-1].name):
        raise ConfigError(f"--resume {src}: {out} holds later checkpoints (steps {steps}), which this run would "
                          f"write over; resume from {have[-1]}, or branch with --output-dir NEW_DIR")


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint; for checkpoints written before it existed, what state.pt and the
    checkpoint's config.yaml give (no run id)."""
    f = path / ckpt.META_FILE
    if f.is_file():
        return json.loads(f.read_text())
    state = torch.load(path / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
    meta: dict[str, Any] = {"step": int(state["step"]), "world_size": int(state.get("world_size", 1))}
    if (path / "config.yaml").is_file():
        meta.update(resume_values(load_config(path / "config.yaml"), meta["world_size"]))
    return meta


def resume_values(cfg: Config, world: int) -> dict[str, Any]:
    """The RESUME_KEYS of a run (stored in every checkpoint's meta.json)."""
    return {k: world if k == "world_size" else get_value(cfg, k) for k in RESUME_KEYS}


def _check_resume(cfg: Config, src: Path, meta: dict, world: int, allow: tuple[str, ...]) -> None:
    step = int(meta["step"])
    if cfg.optim.max_steps <= step:
        raise ConfigError(f"--resume {src}: the checkpoint is at step {step} and optim.max_steps is "
                          f"{cfg.optim.max_steps}; nothing to train (nothing was changed). Raise --max-steps "
                          f"(with --allow-changed optim.max_steps) to train further")
    now = resume_values(cfg, world)
    changed = {k: (meta[k], now[k]) for k in RESUME_KEYS if k in meta and meta[k] != now[k] and k not in allow}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume {src}: this run changes {what}; the data stream position or the LR schedule "
                          f"would not continue the checkpointed run. To continue anyway pass "
                          f"--allow-changed {' '.join(changed)}")
