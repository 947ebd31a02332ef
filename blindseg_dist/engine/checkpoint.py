"""Checkpoints: DIR/checkpoints/<step>/ with model.safetensors, state.pt (optimizer, scheduler, step,
counters), rng-<rank>.pt (every rank's RNG states), config.yaml and meta.json (step, the id of the
run that wrote it, world size, batch and schedule: what engine/rundir.py checks on resume).

A checkpoint is written into a temporary folder and renamed when complete, so a folder named by a
step number is always whole; the last ``keep_last`` of the writing run are kept (checkpoints of
another run id, and the ``protect``-ed ones, are never deleted or replaced). Only rank 0 writes
shared files; every rank writes its own RNG file; after each phase the ranks agree on whether every
rank's part succeeded (one all-gather of a flag), so a failure on one rank stops them all in step.

A disk that is full, or too full for another checkpoint (free space below the size of the last
one, or of the weights for the first), stops with :class:`CheckpointError` on every rank: the
message names the folder, the free space and the size needed; the temporary folder is removed and
the previous checkpoints are untouched. Testing hook: BLINDSEG_FAULT_DISK_FREE=BYTES makes the
free-space check see that many free bytes (tests/engine/test_faults.py).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import atomic, dist
from ..errors import ConfigError

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


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, I/O error); nothing of it was left behind."""


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes of the file system holding ``path`` (BLINDSEG_FAULT_DISK_FREE overrides: tests)."""
    fake = os.environ.get("BLINDSEG_FAULT_DISK_FREE")
    return int(fake) if fake else shutil.disk_usage(path).free


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _agree(error: str | None, step: int, tmp: Path) -> None:
    """Collective: every rank learns which ranks failed their part; on any failure rank 0 removes
    the temporary folder and every rank raises CheckpointError."""
    failed = [r for r, bad in enumerate(dist.gather_sizes(int(error is not None), tag="checkpoint")) if bad]
    if not failed:
        return
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        error = f"rank(s) {failed} could not write their part (see their message)"
    err = CheckpointError(f"checkpoint step {step} not written: {error}; its temporary folder {tmp} was removed, "
                          f"the previous checkpoints are kept")
    err.errno = errno.ENOSPC if "No space left" in error else errno.EIO
    raise err


def _attempt(fn: Callable[[], None], root: Path, errors: tuple = (OSError,)) -> str | None:
    """None when ``fn()`` succeeded, else what went wrong (saying so when the disk is full: torch.save
    reports ENOSPC as a RuntimeError about positions)."""
    try:
        fn()
    except errors as e:
        msg = f"{type(e).__name__}: {e}"
        try:
            full = getattr(e, "errno", None) == errno.ENOSPC or free_bytes(root) < 2**20
        except OSError:
            full = False
        if full and "No space left" not in msg:
            msg = f"No space left on device in {root} ({_mb(free_bytes(root))} free): {msg}"
        return msg
    return None


def _prepare_tmp(output_dir: str | Path, final: Path, tmp: Path, model_state: dict[str, torch.Tensor]) -> None:
    """Rank 0: the temporary folder of checkpoint ``final``, if the disk can take a checkpoint (the
    size of the last one, else of the weights); an OSError ENOSPC naming the folder otherwise."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    previous = [p for p in list_checkpoints(output_dir) if p != final]
    needed = folder_bytes(previous[-1]) if previous else sum(
        v.numel() * v.element_size() for v in model_state.values())
    free = free_bytes(root)
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left for it in {root}: {_mb(free)} free, the "
                      f"{'last checkpoint takes' if previous else 'weights alone take'} {_mb(needed)}. "
                      f"Free space or set run.output_dir on a larger disk, then continue with --resume")
    tmp.mkdir()


def _write_rank_part(tmp: Path, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                     config_yaml: str | None, meta: dict[str, Any] | None,
                     model_metadata: dict[str, str] | None) -> None:
    """This rank's RNG state; on rank 0 also the weights, config, training state and meta.json."""
    torch.save(rng_state(), tmp / f"rng-{dist.rank()}.pt")
    if dist.rank() == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
                  metadata=model_metadata)
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        torch.save({**state, "step": step, "world_size": dist.world_size()}, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({**(meta or {}), "step": step}, indent=1))


def _publish(output_dir: str | Path, tmp: Path, final: Path, run_id: str | None, keep_last: int,
             protect: Sequence[Path]) -> None:
    """Rank 0: rename ``tmp`` to ``final``, then delete this run's checkpoints beyond ``keep_last``
    (never those in ``protect``)."""
    atomic.replace_dir(tmp, final)
    keep = {Path(p).resolve() for p in protect}
    own = [p for p in list_checkpoints(output_dir) if run_id_of(p) == run_id and p.resolve() not in keep]
    for old in own[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


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
    model_metadata: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank must call it).

    collective_save(tmp_dir), if given, runs on every rank inside the temporary folder (DeepSpeed's
    engine.save_checkpoint: each rank writes its optimizer partition under tmp_dir/deepspeed).
    ``meta`` (with "run_id") goes to meta.json; keep_last then deletes only older checkpoints of
    that run id, never those in ``protect``. A checkpoint ``step`` of another run id is never replaced
    (RuntimeError on every rank, before anything is written). ``model_metadata`` goes into the
    safetensors header of model.safetensors (a frozen backbone's source: ``frozen_metadata``). Every
    phase ends with the ranks agreeing that it worked (_agree): one rank's I/O error stops all of
    them, the old checkpoints kept."""
    root = checkpoint_dir(output_dir)
    final = root / str(step)
    tmp = root / f".tmp-{step}"
    run_id = (meta or {}).get("run_id")
    if final.is_dir() and run_id_of(final) != run_id:
        raise RuntimeError(f"checkpoint {final} was written by another run (id {run_id_of(final)}); "
                           "not replacing it")
    main = dist.rank() == 0
    _agree(_attempt(lambda: _prepare_tmp(output_dir, final, tmp, model_state), root) if main else None, step, tmp)
    error = _attempt(lambda: collective_save(tmp), root) if collective_save is not None else None
    write_part = lambda: _write_rank_part(tmp, step, model_state, state, config_yaml, meta, model_metadata)  # noqa: E731
    error = error or _attempt(write_part, root, (OSError, RuntimeError))  # not a collective: RuntimeError is I/O
    _agree(error, step, tmp)
    _agree(_attempt(lambda: _publish(output_dir, tmp, final, run_id, keep_last, protect), root) if main else None,
           step, tmp)
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
    try:
        return load_file(str(f))
    except Exception as e:  # noqa: BLE001 - truncated, or not a safetensors file
        raise ConfigError(f"checkpoint file {str(f)!r} cannot be read ({type(e).__name__}: {e}): truncated or "
                          f"not a {MODEL_FILE}; use another checkpoint (for --resume: remove this folder to "
                          f"continue from the one before)") from None


# ---- checkpoints without the frozen backbone ------------------------------------------------------
FROZEN_FILE_KEY, FROZEN_SHA_KEY, FROZEN_KEYS_KEY = "blindseg.frozen_file", "blindseg.frozen_sha256", "blindseg.frozen_keys"


def frozen_state_keys(net: torch.nn.Module) -> set[str]:
    """State-dict keys of ``net`` that training never changes: frozen parameters (requires_grad False)
    and the buffers of a frozen encoder's modules (model/freeze.py)."""
    keys = {n for n, p in net.named_parameters() if not p.requires_grad}
    for owner, module in net.named_modules():
        for name in getattr(module, "frozen_modules", ()):
            prefix = ".".join(p for p in (owner, name) if p)
            keys |= {f"{prefix}.{b}" for b, _ in net.get_submodule(prefix).named_buffers()}
    return keys & set(net.state_dict())


def file_sha256(path: str | Path) -> str:
    from ..data.shards import _sha256  # the project's one file-digest helper

    return _sha256(Path(path))


def frozen_metadata(pretrained: str | Path, sha256: str, keys: int) -> dict[str, str]:
    """The safetensors header entries of a checkpoint that leaves out ``keys`` frozen tensors, which
    come from the backbone weights file ``pretrained`` (its sha256) when the network is rebuilt."""
    return {FROZEN_FILE_KEY: str(Path(pretrained).resolve()), FROZEN_SHA_KEY: sha256, FROZEN_KEYS_KEY: str(keys)}


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint's model.safetensors ({} when none)."""
    from safetensors import safe_open

    p = Path(path)
    f = p / MODEL_FILE if p.is_dir() else p
    if not f.is_file():
        return {}
    try:
        with safe_open(str(f), framework="pt") as h:
            return dict(h.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: load_model_weights names it
        return {}


def frozen_source(checkpoint: str | Path, pretrained: str | Path | None = None) -> str | None:
    """The backbone weights file a checkpoint without its frozen tensors needs (None: a whole
    checkpoint). ``pretrained`` (the config's model.pretrained) is checked against the recorded sha256;
    without it the recorded path is used. A different or missing file is a ConfigError."""
    meta = weights_metadata(checkpoint)
    if FROZEN_SHA_KEY not in meta:
        return None
    recorded, sha = meta[FROZEN_FILE_KEY], meta[FROZEN_SHA_KEY]
    path = Path(pretrained) if pretrained not in (None, "none") else Path(recorded)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} holds the trained tensors only; its frozen backbone "
                          f"comes from {recorded} (sha256 {sha[:16]}...), which is not at {path}: put that file "
                          "there or set model.pretrained to its path")
    got = file_sha256(path)
    if got != sha:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} was trained on the frozen backbone {recorded} (sha256 "
                          f"{sha[:16]}...), but {path} has sha256 {got[:16]}...: a different backbone file; "
                          "set model.pretrained to the file the run was trained on")
    return str(path)


def fit_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path,
                partial: bool = False) -> None:
    """``net.load_state_dict(weights)``, or a ConfigError naming ``source`` and what does not fit
    (a checkpoint of another backbone or class count). ``partial``: a checkpoint without the frozen
    tensors (``frozen_source``), which ``net`` already holds from the backbone file."""
    own = net.state_dict()
    if partial:
        frozen = frozen_state_keys(net)
        own = {k: v for k, v in own.items() if k not in frozen or k in weights}
    missing = sorted(k for k in own if k not in weights)
    unexpected = sorted(k for k in weights if k not in own)
    shapes = [f"{k}: file {tuple(weights[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"checkpoint {str(source)!r} does not fit this network (another model.backbone or "
                          f"model.num_classes?): {len(missing)} missing {missing[:3]}, {len(unexpected)} "
                          f"unexpected {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:2]}")
    net.load_state_dict(weights, strict=not partial)


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(training state, this rank's RNG state or None if the checkpoint came from fewer ranks)."""
    p = Path(path)

    def read(f: Path):
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - truncated or not a torch file
            raise ConfigError(f"checkpoint file {str(f)!r} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): truncated?; use another checkpoint "
                              f"(for --resume: remove {str(p)!r} to continue from the one before)") from None

    state = read(p / STATE_FILE)
    rng_file = p / f"rng-{dist.rank()}.pt"
    rng = read(rng_file) if rng_file.is_file() else None
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
