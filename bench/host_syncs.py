"""Host synchronisations of one BlindNet training step, per loss and scope, counted on the CPU
(docs/GPU_STEP.md, "Host synchronisations").

On a GPU the host waits for the device whenever it needs a value or a shape that only the device
knows; the GPU's queue drains and it idles while Python decides what to launch next. This bench
runs one step (objective forward + backward, and the trainer's reads of the loss terms) on the CPU
under a TorchDispatchMode that follows which tensors would live on the device and counts:

- ``item``: ``_local_scalar_dense`` of a device tensor (``.item()``, ``int()``, ``float()``, ``bool()``);
- ``d2h``: ``.tolist()``, ``.numpy()``, ``.cpu()`` of a device tensor (explicit device-to-host copies);
- ``shape``: ops whose output shape depends on device values: ``nonzero``, ``unique`` (every
  variant), ``masked_select``, indexing or index_put with a boolean mask, ``bincount`` and
  ``repeat_interleave`` without ``output_size`` (CUDA reads the maximum / the total back);
- ``h2d``: a copy of host data to the device that is not ``non_blocking`` (``.to(device)``,
  ``torch.tensor`` / ``torch.as_tensor`` with ``device=``; CUDA synchronises the stream after such
  a copy), or host data first used by a device op. In the total.

Device tensors: the step's inputs (images, labels), the parameters, every output of an op with a
device input, and factory ops (``zeros``, ``arange``, ``full`` ...) except those drawn from a host
generator or built from Python/NumPy data without ``device=`` (host until moved). Attribution: the objective's calls of the losses
and samplers are wrapped (the same units as its ``record_function("blindseg/...")`` ranges).

    .venv/bin/python bench/host_syncs.py [--label before] [--backbone resnet18] [--crop 128] [--batch 2]
        [--scopes image,global] [--plans] [--out bench/results/host_syncs.json]

Prints a table and writes the JSON: one entry per --label (an existing label is replaced, the
others kept in order: "before" first, then one per change).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from blindseg_dist import atomic  # noqa: E402
from blindseg_dist.model import build_model  # noqa: E402
from blindseg_dist.model import objective as objective_mod  # noqa: E402
from blindseg_dist.losses.plans import PLAN_KEY, SDCL_KEY, LoaderPlanner  # noqa: E402
from blindseg_dist.model.objective import BlindNetObjective, LossWeights, projection_sizes  # noqa: E402

KINDS = ("item", "d2h", "shape", "h2d")
aten = torch.ops.aten
_SHAPE_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
              aten.unique_dim.default, aten.unique_consecutive.default, aten.unique_dim_consecutive.default}
_FROM_HOST_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# the objective's calls, wrapped by name: unit of attribution for each
UNITS = {"sample_seeds": "seeds", "cwcl_plan": "cwcl", "class_wise_contrastive_loss": "cwcl",
         "cwcl_plan_from_loader": "cwcl",
         "sdcl_plan": "sdcl", "sdcl_image_plans": "sdcl", "semantic_disentanglement_loss": "sdcl", "segmentation_loss": "ce",
         "covariance_losses": "cml+ccl", "cwcl_pixels": "cwcl", "sdcl_pixels": "sdcl"}


class HostSyncCounter(TorchDispatchMode):
    """Counts the host synchronisations a CUDA run of the same code would make (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.device = WeakTensorKeyDictionary()  # tensors that would live on the device
        self.unit = "other"
        self.counts: dict[str, dict[str, int]] = {}
        self.ops: dict[str, dict[str, int]] = {}  # unit -> "kind:op" -> count (what was counted)
        self._quiet = 0

    # ---- marking
    def mark(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.device[t] = True

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.device

    def count(self, kind: str, what: str) -> None:
        if self._quiet:
            return
        c = self.counts.setdefault(self.unit, dict.fromkeys(KINDS, 0))
        c[kind] += 1
        o = self.ops.setdefault(self.unit, {})
        o[f"{kind}:{what}"] = o.get(f"{kind}:{what}", 0) + 1

    @contextlib.contextmanager
    def attributed(self, unit: str):
        old, self.unit = self.unit, unit
        try:
            yield
        finally:
            self.unit = old

    # ---- the dispatch rule
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        dev_in = [t for t in tensors if self.on_device(t)]
        name = func.overloadpacket.__name__
        if dev_in:
            for t in tensors:  # host data meeting device data: it was copied there first
                if t not in self.device and t.dim() > 0:
                    self.count("h2d", name)
                    self.device[t] = True
            if func is aten._local_scalar_dense.default:
                self.count("item", "item")
            elif func in _SHAPE_OPS:
                self.count("shape", name)
            elif func in (aten.bincount.default,) or (
                    func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
                self.count("shape", name)
            elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                          aten._index_put_impl_.default):
                idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                    self.count("shape", f"{name}[bool]")
        out = func(*args, **kwargs)
        host_factory = (not tensors and (kwargs.get("generator") is not None or func in _FROM_HOST_DATA))
        if dev_in or (not tensors and not host_factory):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.device[t] = True
        return out

    # ---- the Python-level reads (they reach no dispatch on a CPU tensor)
    @contextlib.contextmanager
    def python_reads(self):
        mode = self
        orig = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy", "cpu", "to")}
        factories = {n: getattr(torch, n) for n in ("tensor", "as_tensor")}

        def to(t, *a, **k):
            dev = k.get("device", next((x for x in a if isinstance(x, (torch.device, str))), None))
            out = orig["to"](t, *a, **k)
            if dev is not None and not mode.on_device(t):
                if not k.get("non_blocking", False):  # pinned memory, asynchronous: no wait
                    mode.count("h2d", "to")
                mode.device[out] = True
            return out

        def factory(name):
            def make(*a, **k):
                out = factories[name](*a, **k)
                src = a[0] if a else k.get("data")
                if k.get("device") is not None and not mode.on_device(src):
                    mode.count("h2d", name)
                    mode.device[out] = True
                return out
            return make

        def tolist(t, *a, **k):
            if mode.on_device(t):
                mode.count("d2h", "tolist")
            return orig["tolist"](t, *a, **k)

        def numpy(t, *a, **k):
            if mode.on_device(t):
                mode.count("d2h", "numpy")
            return orig["numpy"](t, *a, **k)

        def cpu(t, *a, **k):
            if not mode.on_device(t):
                return orig["cpu"](t, *a, **k)
            mode.count("d2h", "cpu")
            mode._quiet += 1
            try:
                host = t.detach().clone()
            finally:
                mode._quiet -= 1
            mode.device.pop(host, None)
            return host

        torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.to = tolist, numpy, cpu, to
        torch.tensor, torch.as_tensor = factory("tensor"), factory("as_tensor")
        try:
            yield
        finally:
            for n, f in orig.items():
                setattr(torch.Tensor, n, f)
            for n, f in factories.items():
                setattr(torch, n, f)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for c in self.counts.values():
            for k in KINDS:
                out[k] += c[k]
        return out


@contextlib.contextmanager
def _attributing(mode: HostSyncCounter):
    """Wrap the objective's calls of the losses and samplers so that counts go to their unit."""
    saved = {}
    for name, unit in UNITS.items():
        if not hasattr(objective_mod, name):
            continue
        fn = saved[name] = getattr(objective_mod, name)

        def wrapped(*a, _fn=fn, _unit=unit, **k):
            with mode.attributed(_unit):
                return _fn(*a, **k)

        setattr(objective_mod, name, wrapped)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(objective_mod, name, fn)


def synthetic_batch(batch: int, crop: int, seed: int = 0) -> dict:
    """Blocky labels with every class, an ignore strip (as bench/comm.py), two random views."""
    from bench.comm import synthetic_labels

    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, crop, crop, generator=g),
            "image_aug": torch.randn(batch, 3, crop, crop, generator=g),
            "label": synthetic_labels(batch, crop, g)}


def count_step(weights: LossWeights, *, backbone: str = "resnet18", crop: int = 128, batch: int = 2,
               step: int = 3, seed: int = 0, plans: bool = False) -> HostSyncCounter:
    """One training step (after a warm-up step, so that lazy initialisation is not counted).
    ``plans``: CWCL's sampling plans and SDCL's per-pixel keys come with the batch, made in the
    loader (as the trainer runs it; the workers' work is not the step's) and copied to the device
    with the batch (pinned, non_blocking: no wait)."""
    torch.manual_seed(seed)
    net = build_model(backbone)
    obj = BlindNetObjective(net, weights, run_seed=seed).train()
    data = synthetic_batch(batch, crop, seed)
    gidx = torch.arange(step * batch, (step + 1) * batch)
    planner = LoaderPlanner(seed, projection_sizes(net, crop), batch, sdcl_keys=True) if plans else None

    def plans_for(k: int) -> dict:
        if planner is None:
            return {}
        made = planner({"label": data["label"]}, k)
        return {"plans": made[PLAN_KEY], "sdcl_keys": made[SDCL_KEY]}

    obj(data["image"], data["label"], data["image_aug"], step=step - 1, global_index=gidx - batch,
        **plans_for(step - 1))["total"].backward()
    mode = HostSyncCounter()
    params = [p for p in obj.parameters()]
    mode.mark(*params, *[p.grad for p in params if p.grad is not None], *obj.buffers())
    image, label, image_aug = data["image"].clone(), data["label"].clone(), data["image_aug"].clone()
    step_plans = plans_for(step)
    mode.mark(image, label, image_aug, *[t for lvl in step_plans.get("plans", []) for t in lvl.values()],
              *step_plans.get("sdcl_keys", []))
    with mode, mode.python_reads(), _attributing(mode):
        out = obj(image, label, image_aug, step=step, global_index=gidx, **step_plans)
        with mode.attributed("trainer"):
            # what Trainer.train_step reads after the forward: the non-finite flag and, in
            # _accumulate, every loss term and the total (one value each)
            flag = torch.tensor([float(not torch.isfinite(out["total"])), 0.0])
            bool(flag[1] > 0), bool(flag[0] > 0)
        with mode.attributed("backward"):
            out["total"].backward()
        with mode.attributed("trainer"):
            from blindseg_dist.engine.trainer import Trainer

            ns = SimpleNamespace(micro=1, world=1, images_seen=0, counters={"corrupt_shards": 0})
            Trainer._accumulate(ns, {}, out, {"image": image})
    return mode


SCOPE_WEIGHTS = {
    "image": dict(contrastive_scope="image", covariance_scope="image"),
    "global": dict(contrastive_scope="global", covariance_scope="batch"),
}


def run(scopes, backbone: str, crop: int, batch: int, plans: bool = False) -> dict:
    res = {}
    for scope in scopes:
        w = dataclasses.replace(LossWeights(), **SCOPE_WEIGHTS[scope])
        mode = count_step(w, backbone=backbone, crop=crop, batch=batch, plans=plans)
        units = {u: dict(c, total=sum(c.values())) for u, c in sorted(mode.counts.items())}
        res[scope] = {"by_unit": units, "total": sum(mode.totals().values()), "by_kind": mode.totals(),
                      "ops": {u: dict(sorted(o.items())) for u, o in sorted(mode.ops.items())}}
    return res


def table(res: dict, label: str) -> str:
    units = sorted({u for r in res.values() for u in r["by_unit"]})
    scopes = list(res)
    lines = [f"host synchronisations of one training step ({label}); per unit: total (item/d2h/shape/h2d)",
             f"{'unit':<10}" + "".join(f"{s:>26}" for s in scopes)]
    for u in units:
        row = f"{u:<10}"
        for s in scopes:
            c = res[s]["by_unit"].get(u)
            row += f"{'-':>26}" if c is None else f"{c['total']:>8} ({c['item']}/{c['d2h']}/{c['shape']}/{c['h2d']})".rjust(26)
        lines.append(row)
    lines.append(f"{'total':<10}" + "".join(f"{res[s]['total']:>26}" for s in scopes))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="current", help="name of this entry (before, after-..., current)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--scopes", default="image,global")
    ap.add_argument("--plans", action="store_true",
                    help="CWCL's sampling plans come with the batch (the trainer's way, losses/plans.py)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/host_syncs.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scopes = [s for s in args.scopes.split(",") if s]
    for s in scopes:
        if s not in SCOPE_WEIGHTS:
            ap.error(f"--scopes: {s!r} is not one of {sorted(SCOPE_WEIGHTS)}")
    res = run(scopes, args.backbone, args.crop, args.batch, args.plans)
    print(table(res, args.label))
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"entries": []}
    entry = {"label": args.label, "backbone": args.backbone, "crop": args.crop, "batch": args.batch,
             "loader_plans": args.plans,
             "command": "bench/host_syncs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "scopes": res}
    entries = [e for e in doc.get("entries", [])]
    names = [e["label"] for e in entries]
    if args.label in names:
        entries[names.index(args.label)] = entry
    else:
        entries.append(entry)
    doc = {"what": "host synchronisations of one training step (bench/host_syncs.py docstring: the rules)",
           "entries": entries}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, doc, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
