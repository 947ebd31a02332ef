"""Checkpoints: DIR/checkpoints/<step>/ with model.safetensors, state.pt (optimizer, scheduler, step,
counters), rng-<rank>.pt (every rank's RNG states), config.yaml and meta.json (step, the id of the
run that wrote it, world size, batch and schedule: what engine/rundir.py checks on resume).

A checkpoint is written into a temporary folder and renamed when complete, so a folder named by a
step number is always whole; the last ``keep_last`` of the writing run are kept (checkpoints of
another run id, and the ``protect``-ed ones, are never deleted or replaced). Only rank 0 writes
shared files; every rank writes its own RNG file; barriers order the steps.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import atomic, dist

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not listed)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def run_id_of(path: Path) -> str | None:
    """The id of the run that wrote checkpoint ``path`` (None: written before run ids existed)."""
    try:
        return json.loads((path / META_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    config_yaml: str | None = None,
    keep_last: int = 3,
    collective_save: Callable[[Path], None] | None = None,
    meta: dict[str, Any] | None = None,
    protect: Sequence[Path] = (),
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank must call it).

    collective_save(tmp_dir), if given, runs on every rank inside the temporary folder (DeepSpeed's
    engine.save_checkpoint: each rank writes its optimizer partition under tmp_dir/deepspeed).
    ``meta`` (with "run_id") goes to meta.json; keep_last then deletes only older checkpoints of
    that run id, never those in ``protect``. A checkpoint ``step`` of another run id is never replaced
    (RuntimeError on every rank, before anything is written)."""
    root = checkpoint_dir(output_dir)
    final = root / str(step)
    tmp = root / f".tmp-{step}"
    run_id = (meta or {}).get("run_id")
    if final.is_dir() and run_id_of(final) != run_id:
        raise RuntimeError(f"checkpoint {final} was written by another run (id {run_id_of(final)}); "
                           "not replacing it")
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng-{dist.rank()}.pt")
    if collective_save is not None:
        collective_save(tmp)
    if dist.rank() == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        torch.save({**state, "step": step, "world_size": dist.world_size()}, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({**(meta or {}), "step": step}, indent=1))
    dist.barrier()
    if dist.rank() == 0:
        atomic.replace_dir(tmp, final)
        keep = {Path(p).resolve() for p in protect}
        own = [p for p in list_checkpoints(output_dir) if run_id_of(p) == run_id and p.resolve() not in keep]
        for old in own[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a checkpoint folder or a .safetensors file, with a clear error if absent."""
    p = Path(path)
    f = p / MODEL_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(
            f"no model weights at {str(f)!r}: pass a checkpoint folder (runs/<name>/checkpoints/<step>) "
            f"or its {MODEL_FILE}"
        )
    return load_file(str(f))


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(training state, this rank's RNG state or None if the checkpoint came from fewer ranks)."""
    p = Path(path)
    state = torch.load(p / STATE_FILE, map_location="cpu", weights_only=False)
    rng_file = p / f"rng-{dist.rank()}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return state, rng


_HEADS = ("aux_head.", "proj_heads.")  # training-only modules: absent from an inference checkpoint


def load_init_weights(net: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """``model.init_from``: copy the weights of ``path`` into ``net`` before training (weights only:
    the optimizer, schedule and step start fresh). ``path``: a checkpoint folder, its
    model.safetensors, or a folder written by `blindseg import-checkpoint`.

    Every weight of the inference network must be there with its shape. Training-only heads may
    differ (e.g. BlindNet started from a baseline, which has no projection heads): heads missing
    from the file keep their initialization, head weights the network lacks are ignored; both are
    reported. Anything else raises a ConfigError naming ``model.init_from``. Returns a report."""
    import logging

    from ..config import ConfigError

    p = Path(path)
    if p.suffix in (".pth", ".pt", ".tar"):
        raise ConfigError(f"config key 'model.init_from': {str(p)!r} is a torch file; convert a released "
                          "BlindNet/RobustNet checkpoint first with `blindseg import-checkpoint FILE --config "
                          "CFG --out DIR` and set model.init_from=DIR")
    try:
        state = load_model_weights(p)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'model.init_from': {e}") from None
    own = net.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    bad_missing = [k for k in missing if not k.startswith(_HEADS)]
    bad_unexpected = [k for k in unexpected if not k.startswith(_HEADS)]
    bad_shape = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if bad_missing or bad_unexpected or bad_shape:
        raise ConfigError(
            f"config key 'model.init_from': {p} does not fit this network (model.backbone, "
            f"model.num_classes?): {len(bad_missing)} missing {bad_missing[:5]}, {len(bad_unexpected)} "
            f"unexpected {bad_unexpected[:5]}, {len(bad_shape)} shape mismatches {bad_shape[:3]}"
        )
    net.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    report = {"path": str(p), "loaded": len(own) - len(missing), "heads_kept_at_init": missing,
              "ignored": unexpected}
    log = logging.getLogger(__name__)
    log.info("model.init_from: %d tensors from %s (optimizer, schedule and step start fresh)", report["loaded"], p)
    if missing or unexpected:
        log.warning("model.init_from: %d head tensors not in the file keep their init (%s); %d in the file "
                    "are not in this network and are ignored (%s)", len(missing),
                    ", ".join(sorted({k.split('.')[0] for k in missing})) or "-", len(unexpected),
                    ", ".join(sorted({k.split('.')[0] for k in unexpected})) or "-")
    return report
