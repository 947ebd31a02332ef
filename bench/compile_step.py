"""torch.compile on the training step (run.compile; docs/GPU_STEP.md, "torch.compile").

1. Graph breaks (torch._dynamo.explain) of the network's training forward (both call signatures of
   a step: the original view with the aux head, the augmented view without it; sparse heads) and of
   a projection head's row path; and what explain makes of the whole objective (losses included).
2. Step time (both views, every loss, backward, SGD) of the eager network against the compiled one
   (model/compiled.compile_network, the code run.compile runs), alternating within each round after
   the warm-up; the compile time (first steps) is recorded apart.

    .venv/bin/python bench/compile_step.py [--backend inductor] [--backbone resnet18] [--crop 128]
        [--batch 2] [--steps 5] [--warmup 2] [--threads 1] [--out bench/results/compile_step.json]

Prints a table and writes the JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.host_syncs import synthetic_batch  # noqa: E402
from blindseg_dist import atomic  # noqa: E402
from blindseg_dist.model import build_model  # noqa: E402
from blindseg_dist.model.compiled import BACKENDS, compile_network  # noqa: E402
from blindseg_dist.model.objective import BlindNetObjective, LossWeights  # noqa: E402


def _explain(fn, *args, **kwargs) -> dict:
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(fn)(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - recorded: what stops the capture
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    reasons = Counter(str(b.reason).splitlines()[0][:160] for b in ex.break_reasons)
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "ops": ex.op_count,
            "break_reasons": dict(reasons.most_common())}


def graph_breaks(backbone: str, crop: int, batch: int, objective: bool = True) -> dict:
    torch.manual_seed(0)
    net = build_model(backbone).train()
    d = synthetic_batch(batch, crop)
    out = {"forward_original_view": _explain(net, d["image"], dense_embeds=False),
           "forward_augmented_view": _explain(net, d["image_aug"], with_aux=False, dense_embeds=False)}
    feats = net(d["image"], dense_embeds=False)["proj_inputs"][0]
    rows = feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1])[:500]
    out["projection_head_rows"] = _explain(net.proj_heads[0].rows, rows)
    if objective:
        obj = BlindNetObjective(net, LossWeights(), run_seed=0).train()
        out["objective_with_losses"] = _explain(obj, d["image"], d["label"], d["image_aug"], step=1,
                                                global_index=torch.arange(batch))
    torch._dynamo.reset()
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_times(backend: str, backbone: str, crop: int, batch: int, steps: int, warmup: int,
               device: str = "cpu") -> dict:
    dev = torch.device(device)
    d = {k: v.to(dev) for k, v in synthetic_batch(batch, crop).items()}
    runs = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        net = build_model(backbone).to(dev)
        if name == "compiled":
            compile_network(net, backend)
        obj = BlindNetObjective(net, LossWeights(), run_seed=0).train()
        runs[name] = (obj, torch.optim.SGD(obj.parameters(), lr=1e-3, momentum=0.9))

    def step(name: str, i: int) -> tuple[float, float]:
        obj, opt = runs[name]
        _sync(dev)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = obj(d["image"], d["label"], d["image_aug"], step=i, global_index=torch.arange(batch))
        out["total"].backward()
        opt.step()
        _sync(dev)
        return time.perf_counter() - t, float(out["total"].detach())

    first = {}
    for name in runs:  # warm-up: the compiled run compiles here (every graph: forward, backward, heads)
        t = time.perf_counter()
        for i in range(warmup):
            step(name, i)
        first[name] = time.perf_counter() - t
    times = {n: [] for n in runs}
    losses = {n: [] for n in runs}
    for i in range(steps):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            dt, loss = step(name, warmup + i)
            times[name].append(dt)
            losses[name].append(loss)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"median_step_s": med, "all_step_s": times, "warmup_s": first, "losses": losses,
            "compiled_over_eager": statistics.median(c / e for c, e in zip(times["compiled"], times["eager"])),
            "compile_s": first["compiled"] - first["eager"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="inductor", choices=BACKENDS)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-breaks", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/compile_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"backend": args.backend, "backbone": args.backbone, "crop": args.crop, "batch": args.batch,
           "threads": args.threads, "torch": torch.__version__,
           "command": "bench/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.skip_breaks:
        res["graph_breaks"] = graph_breaks(args.backbone, args.crop, args.batch)
        print("graph breaks (torch._dynamo.explain):")
        for what, r in res["graph_breaks"].items():
            if "error" in r:
                print(f"  {what:<26} capture stops: {r['error']}")
            else:
                print(f"  {what:<26} graphs {r['graphs']:>3}  breaks {r['graph_breaks']:>3}  ops {r['ops']:>5}")
                for reason, n in list(r["break_reasons"].items())[:5]:
                    print(f"      {n} x {reason}")
    t = step_times(args.backend, args.backbone, args.crop, args.batch, args.steps, args.warmup)
    res["step_time"] = t
    m = t["median_step_s"]
    print(f"step time, {args.backbone}, crop {args.crop}, {args.batch} images, {args.threads} thread(s), median of "
          f"{args.steps} alternating rounds after {args.warmup} warm-up steps:")
    print(f"  eager {m['eager']:.3f} s   compiled ({args.backend}) {m['compiled']:.3f} s   compiled/eager "
          f"{t['compiled_over_eager']:.3f}   compile time ~{t['compile_s']:.0f} s")
    atomic.write_json(args.out, res, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
