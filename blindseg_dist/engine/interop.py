"""Checkpoints of the released BlindNet / RobustNet code, both ways.

The released format (what its training writes and its valid.py reads) is one torch.save'd dict:
``{"state_dict", "optimizer", "scheduler", "epoch", "mean_iu", "command"}``; the state dict comes
from the DistributedDataParallel-wrapped DeepV3Plus, so every key starts with ``module.``. Its
loader matches keys of the DDP-wrapped network by name and shape and silently skips the rest,
and reads ``epoch`` and ``mean_iu`` unconditionally.

Module names of the released DeepV3Plus (ResNet trunks) and ours, one to one:

| released | ours |
|---|---|
| ``layer0.0`` (7x7 stem conv; ``layer0.1`` is the IN, no weights) | ``backbone.conv1`` |
| ``layer1..layer4`` (torchvision block names inside) | ``backbone.layer1..layer4`` |
| ``aspp.img_conv.{0,1}`` (pooling branch conv, BN) | ``decoder.aspp.pool.{0,1}`` |
| ``aspp.features.{0..3}.{0,1}`` (1x1 and the three dilated branches) | ``decoder.aspp.branches.{0..3}.{0,1}`` |
| ``bot_aspp.{0,1}`` (1280 -> 256) | ``decoder.aspp.project.{0,1}`` |
| ``bot_fine.{0,1}`` (256 -> 48) | ``decoder.low_proj.{0,1}`` |
| ``final1.{0,1,3,4}`` (two 3x3 conv + BN) | ``decoder.fuse.{0.0,0.1,1.0,1.1}`` |
| ``final2.0`` (classifier) | ``decoder.classifier`` |
| ``dsn.{0,1,4}`` (aux head) | ``aux_head.body.{0,1,4}`` |
| ``ProjectionHead_cls_{j}.proj.{0,2}`` | ``proj_heads.{j}.body.{0,2}`` |

The three InstanceNorm layers have no parameters or buffers on either side. Only torchvision
ResNet backbones have a released counterpart.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .. import atomic
from ..config import load_config, model_kwargs, save_config, to_dict
from ..model import build_model
from ..model.backbones import ResNetBackbone
from .checkpoint import MODEL_FILE, frozen_source, load_model_weights

__all__ = ["InteropError", "to_released", "from_released", "released_state_dict", "load_released_file",
           "map_released_weights", "import_checkpoint", "export_checkpoint", "RULES"]


class InteropError(ValueError):
    """A checkpoint that does not map: the message lists the keys and what to do."""


RULES: tuple[tuple[str, str], ...] = (
    ("backbone.conv1.", "layer0.0."),
    *((f"backbone.layer{i}.", f"layer{i}.") for i in range(1, 5)),
    ("decoder.aspp.pool.", "aspp.img_conv."),
    ("decoder.aspp.branches.", "aspp.features."),
    ("decoder.aspp.project.", "bot_aspp."),
    ("decoder.low_proj.", "bot_fine."),
    ("decoder.fuse.0.0.", "final1.0."),
    ("decoder.fuse.0.1.", "final1.1."),
    ("decoder.fuse.1.0.", "final1.3."),
    ("decoder.fuse.1.1.", "final1.4."),
    ("decoder.classifier.", "final2.0."),
    ("aux_head.body.", "dsn."),
    *((f"proj_heads.{j}.body.", f"ProjectionHead_cls_{j}.proj.") for j in range(3)),
)
"""(our prefix, released prefix): the whole key map (see the module docstring)."""

MODULE_PREFIX = "module."


def _rewrite(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    for src, dst in rules:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_released(key: str) -> str | None:
    """Our state-dict key -> the released DeepV3Plus key (no ``module.``), or None if it has none."""
    return _rewrite(key, RULES)


def from_released(key: str) -> str | None:
    """A released key (``module.`` already stripped) -> ours, or None if we have no such weight."""
    return _rewrite(key, ((dst, src) for src, dst in RULES))


def released_state_dict(state: dict[str, Tensor], *, module_prefix: bool = True) -> dict[str, Tensor]:
    """Our (inference or training) state dict with the released names; refuses keys without one."""
    out, unmapped = {}, []
    for k, v in state.items():
        r = to_released(k)
        if r is None:
            unmapped.append(k)
        else:
            out[(MODULE_PREFIX if module_prefix else "") + r] = v
    if unmapped:
        raise InteropError(
            f"{len(unmapped)} weights have no counterpart in the released DeepV3Plus (first: {unmapped[:5]}); "
            "only torchvision ResNet backbones (model.backbone: resnet18/34/50/101) map to it"
        )
    return out


def _numpy_safe_globals() -> list:
    """numpy scalar types a released checkpoint pickles (mean_iu = np.nanmean(...)); numpy 1.x (the
    released environment) names the scalar constructor numpy.core.multiarray.scalar, numpy 2
    numpy._core.multiarray.scalar: both are allowed."""
    out: list = [np.dtype]
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out += [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Int64DType"):
        t = getattr(getattr(np, "dtypes", None), name, None)
        if t is not None:
            out.append(t)
    return out


def load_released_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict without ``module.``, metadata {"epoch", "mean_iu", "command", "other_keys"}) of a
    released checkpoint, or of a bare state dict. Loaded with torch.load(weights_only=True) plus
    the numpy scalar types the released trainer stores: no arbitrary code runs."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError names the object it refused
        raise InteropError(f"{p}: cannot be read as a checkpoint of tensors and numbers "
                           f"(torch.load weights_only): {e}") from None
    if not isinstance(obj, dict):
        raise InteropError(f"{p}: holds a {type(obj).__name__}, not a dict with 'state_dict'")
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise InteropError(f"{p}: no tensors found (keys: {list(obj)[:8]}); expected the released "
                           "{'state_dict': ..., 'epoch', 'mean_iu', ...} or a bare state dict")
    stripped = {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v for k, v in tensors.items()}
    meta: dict[str, Any] = {}
    if state is not obj:
        for k in ("epoch", "mean_iu", "command"):
            if k in obj:
                v = obj[k]
                meta[k] = v.item() if hasattr(v, "item") else v
        meta["other_keys"] = sorted(k for k in obj if k not in ("state_dict", "epoch", "mean_iu", "command"))
    return stripped, meta


_LIST = 40  # keys named per kind in an error (the counts are always complete)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def map_released_weights(released: dict[str, Tensor], own: dict[str, Tensor],
                         allow_missing: Iterable[str] = ()) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Released weights -> a full state dict for a network whose state dict is ``own``.

    Refused (InteropError listing them) unless a pattern of ``allow_missing`` (fnmatch, on the
    released or our name) covers them: released keys we have no weight for ("unknown"), weights
    of ours the file lacks ("missing"; they keep ``own``'s values). BN ``num_batches_tracked``
    counters absent from old files are set to 0 (they change no computation). Shape mismatches
    are always refused. Returns (state dict, report)."""
    allow = list(allow_missing)
    ours_of = {k: from_released(k) for k in released}
    unknown = sorted(k for k, o in ours_of.items() if o is None or o not in own)
    provided = {o: k for k, o in ours_of.items() if o is not None and o in own}
    missing = sorted(k for k in own if k not in provided)
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in counters]
    bad_shape = [f"{provided[k]} {tuple(released[provided[k]].shape)} vs ours {k} {tuple(own[k].shape)}"
                 for k in provided if released[provided[k]].shape != own[k].shape]
    refused_unknown = [k for k in unknown if not _matches(k, allow)]
    refused_missing = [k for k in missing if not (_matches(k, allow) or _matches(to_released(k) or k, allow))]
    problems = []
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatches (another backbone depth or num_classes? check "
                        f"--config): " + "; ".join(bad_shape[:6]))
    if refused_unknown:
        problems.append(f"{len(refused_unknown)} keys in the file have no weight in this network: "
                        + ", ".join(refused_unknown[:_LIST]) + (" ..." if len(refused_unknown) > _LIST else ""))
    if refused_missing:
        problems.append(f"{len(refused_missing)} weights of this network are not in the file (released "
                        "names: " + ", ".join((to_released(k) or k) for k in refused_missing[:_LIST])
                        + (" ..." if len(refused_missing) > _LIST else "") + ")")
    if problems:
        raise InteropError("; ".join(problems) + ". Pass --allow-missing PATTERN ... (fnmatch, e.g. 'dsn.*' "
                           "'ProjectionHead_cls_*') to accept the listed keys, or use the --config of the "
                           "network that was trained.")
    state = {k: v.clone() for k, v in own.items()}
    for k, src in provided.items():
        state[k] = released[src].to(own[k].dtype).clone()
    for k in counters:
        state[k] = torch.zeros_like(own[k])
    report = {"loaded": len(provided), "unknown_allowed": unknown, "missing_allowed": missing,
              "counters_set_to_zero": len(counters)}
    return state, report


def _config_model(config: str | Path, overrides: list[str] | None = None):
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.run.seed)
    net = build_model(**{**model_kwargs(cfg), "pretrained": None})
    return cfg, net


def import_checkpoint(file: str | Path, config: str | Path, out: str | Path, *,
                      allow_missing: Iterable[str] = (), overrides: list[str] | None = None) -> dict[str, Any]:
    """`blindseg import-checkpoint`: a released checkpoint -> OUT/{model.safetensors, config.yaml,
    import.json}, a weights folder that `blindseg eval` / `predict` accept and ``model.init_from``
    starts training from. The network is built from ``config`` (backbone, classes, heads);
    unknown / missing keys are refused unless ``allow_missing`` covers them."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / MODEL_FILE).exists():
        raise InteropError(f"{out / MODEL_FILE} already exists; choose another --out (nothing was overwritten)")
    released, meta = load_released_file(file)
    cfg, net = _config_model(config, overrides)
    if not isinstance(net.backbone, ResNetBackbone):
        raise InteropError(f"config key 'model.backbone': {cfg.model.backbone!r} has no released counterpart; "
                           "released checkpoints are torchvision-ResNet DeepV3Plus networks (resnet50, ...)")
    state, report = map_released_weights(released, net.state_dict(), allow_missing)
    net.load_state_dict(state)  # strict: every key of ours is set
    report = {"source": str(file), "config": str(config), "backbone": cfg.model.backbone,
              "released": meta, **report}
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    with atomic.replacing(out / MODEL_FILE) as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    atomic.write_json(out / "import.json", report, indent=1, default=str)
    print(f"[import] {report['loaded']} tensors from {file} -> {out / MODEL_FILE}"
          + (f" (released epoch {meta['epoch']}, mean_iu {meta['mean_iu']})" if "epoch" in meta else "")
          + (f"; allowed unknown {len(report['unknown_allowed'])}, missing {len(report['missing_allowed'])}"
             if report["unknown_allowed"] or report["missing_allowed"] else ""))
    return report


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, module_prefix: bool = True) -> dict[str, Any]:
    """`blindseg export-checkpoint`: our checkpoint -> the released format, ``{"state_dict"
    (module.-prefixed released names), "epoch": 0, "mean_iu": 0.0, "command", "blindseg"}``, which
    the released valid.py / train.py ``--snapshot`` load (no optimizer: restore it fresh)."""
    out = Path(out)
    if frozen_source(checkpoint) is not None:  # trained tensors only: rebuild the whole network
        from ..tools.evaluate_cli import load_checkpoint_model

        weights = load_checkpoint_model(checkpoint)[1].state_dict()
    else:
        weights = load_model_weights(checkpoint)
    state = released_state_dict(weights, module_prefix=module_prefix)
    name = Path(checkpoint).name
    payload = {
        "state_dict": state,
        "epoch": 0,
        "mean_iu": 0.0,
        "command": f"blindseg export-checkpoint {checkpoint} --out {out}",
        "blindseg": {"checkpoint": str(checkpoint), "step": int(name) if name.isdigit() else None},
    }
    with atomic.replacing(out) as tmp:
        torch.save(payload, tmp)
    heads = sorted({k.split(".")[1 if module_prefix else 0] for k in state})
    report = {"out": str(out), "tensors": len(state), "modules": heads}
    absent = [m for m in ("dsn", "ProjectionHead_cls_0") if m not in heads]
    print(f"[export] {len(state)} tensors -> {out} (released names, 'module.' prefix: {module_prefix})"
          + (f"; no {', '.join(absent)} weights in this checkpoint: the released code keeps its init "
             "for them (unused at evaluation)" if absent else ""))
    return report
