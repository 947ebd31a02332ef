"""Step overhead of the BlindNet losses, measured on what `blindseg train` runs (docs/BENCHMARKS.md, "What a
BlindNet step costs").

Three configurations of one shipped config (default blindnet_r50_gta5): BlindNet (all four losses,
the config's scopes), the same two-view step with CE only (no projection heads, no CML/CCL/CWCL/
SDCL), and the single-view baseline. Each runs in its OWN process, built from the trainer's pieces
(config -> model_kwargs -> build_model, BlindNetObjective(net, cfg.loss, run seed), build_optimizer:
SGD + poly scheduler, the trainer's global indices and per-step seeds, the terms read back as
floats as the trainer logs them), on REAL two-view batches from the training loader
(TwoViewTransform on synthetic GTA5-like scenes written as shards, or --shards): the same batch
sequence for every configuration. The processes take turns step by step (the order alternates
each round) so that machine noise hits all alike.

Why real views, one process per configuration: two INDEPENDENT noise images as the two views, with
random 32-px blocks of 19 classes as labels, make the two views' predictions differ almost
everywhere, so SDCL's correction map is huge (its anchor cap binds at 1000 per image) and every
image holds all classes: far more loss work than on real augmented views; and three models in one
process disturb each other's allocator state.

    .venv/bin/python bench/step_overhead.py [--config blindnet_r50_gta5] [--crop 512] [--batch 2]
        [--rounds 5] [--warmup 1] [--threads 2] [--profile] [--flops] [--shards DIR]

The workers start with the allocator default that `blindseg` sets (blindseg_dist/runtime_env.py:
THP_MEM_ALLOC_ENABLE=1, large CPU buffers on transparent huge pages); THP_MEM_ALLOC_ENABLE=0 in the
environment measures without it. Every step's minor page faults are recorded with its time.

--profile: one extra step of BlindNet and of two-view CE under torch.profiler (CPU): writes the top
operators of each and the per-operator difference (where the extra time goes) to
bench/results/step_overhead_profile_<crop>.txt. --flops: fvcore FLOPs of the forward of each
configuration (the loss terms' share of the step). Writes bench/results/step_overhead_<crop>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from blindseg_dist import atomic, runtime_env
from blindseg_dist.config import load_config, model_kwargs

NAMES = ("blindnet", "two_view_ce", "single_view")
# allocator settings that change step times; recorded with the results when set
ENV_KNOBS = ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
             "LD_PRELOAD", "OMP_NUM_THREADS")


def configure(cfg, name: str):
    """The config of one compared configuration (everything else as in `cfg`)."""
    loss = cfg.loss
    if name == "two_view_ce":
        loss = dataclasses.replace(loss, cml=0, ccl=0, cwcl=0, sdcl=0)
    elif name == "single_view":
        loss = dataclasses.replace(loss, two_view=False, cml=0, ccl=0, cwcl=0, sdcl=0)
    return dataclasses.replace(cfg, loss=loss)


def _worker(conn, cfg, name: str, batches_path: str, threads: int) -> None:
    from blindseg_dist.engine.optim import build_optimizer
    from blindseg_dist.model import build_model
    from blindseg_dist.model.objective import BlindNetObjective

    torch.set_num_threads(threads)
    cfg = configure(cfg, name)
    torch.manual_seed(cfg.run.seed)
    net = build_model(**model_kwargs(cfg))
    obj = BlindNetObjective(net, cfg.loss, run_seed=cfg.run.seed).train()
    opt, sched = build_optimizer(cfg, obj)
    batches = torch.load(batches_path)
    b = cfg.data.batch_size

    def step(k: int) -> tuple[float, int]:
        batch = batches[k % len(batches)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        out = obj(batch["image"], batch["label"], batch["image_aug"] if cfg.loss.two_view else None,
                  step=k, global_index=k * b + torch.arange(b))
        out["total"].backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _ = {t_: float(v.detach()) for t_, v in out["terms"].items()}  # what the trainer logs
        # minor page faults: memory the allocator handed back to the OS and faults in again
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    while True:
        cmd, arg = conn.recv()
        if cmd == "step":
            conn.send(step(arg))
        elif cmd == "profile":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(arg)
            rows = [(e.key, e.self_cpu_time_total, e.cpu_time_total, e.count) for e in prof.key_averages()]
            conn.send(rows)
        elif cmd == "flops":
            conn.send(_fvcore_flops(obj, batches[0], b))
        else:
            conn.send(None)
            return


def _aug_stats_flops(inputs, outputs) -> int:
    """fvcore handle of losses.covariance._AugStats (multiply-adds, as fvcore counts matmuls): the
    Gram F_a F_a^T is B x C x C x N, the cross diagonal B x C x N."""
    from fvcore.nn.jit_handles import get_shape

    b, c, n = get_shape(inputs[0])
    gram, cross = outputs[0].node().scalar_args()  # the (gram, cross) flags of the call
    return b * c * c * n * int(gram) + b * c * n * int(cross)


def _fvcore_flops(obj, batch, b) -> dict:
    """fvcore FLOPs (multiply-adds) of the objective's forward on one batch, by operator."""
    import warnings

    class Total(torch.nn.Module):
        def __init__(self, o):
            super().__init__()
            self.o = o

        def forward(self, image, label, image_aug):
            return self.o(image, label, image_aug, step=0, global_index=torch.arange(b))["total"]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            fca = FlopCountAnalysis(Total(obj), (batch["image"], batch["label"], batch["image_aug"]))
            # the tracer sees a custom autograd Function as one opaque op: count its products
            fca.set_op_handle("prim::PythonOp._AugStats", _aug_stats_flops)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            return {"total": float(fca.total()), "by_operator": {k: float(v) for k, v in fca.by_operator().items()}}
    except Exception as e:  # tracing a data-dependent objective can fail; report it, do not guess
        return {"error": f"{type(e).__name__}: {e}"}


def real_batches(cfg, n: int, shards: str | None) -> list[dict]:
    """n two-view batches from the training loader (synthetic GTA5-like scenes unless `shards`)."""
    from blindseg_dist.data.stream import make_train_loader

    with tempfile.TemporaryDirectory() as tmp:
        if shards is None:
            from blindseg_dist.data import synth
            from blindseg_dist.data.shards import write_shards
            from blindseg_dist.data.sources import get_source

            crop = cfg.data.crop_size
            synth.generate(Path(tmp) / "raw", domains=1, images_per_domain=8, size=(crop, 2 * crop), seed=0,
                           progress=False)
            shards = str(Path(tmp) / "shards")
            write_shards(get_source("gta5", str(Path(tmp) / "raw" / "gta5")), shards, samples_per_shard=2,
                         progress=False, min_shards=1)
        loader = make_train_loader(shards, batch_size=cfg.data.batch_size, crop_size=cfg.data.crop_size,
                                   scale_range=tuple(cfg.data.scale_range), class_uniform=cfg.data.class_uniform,
                                   num_workers=0, seed=cfg.run.seed)
        it = iter(loader)
        return [{k: next_b[k] for k in ("image", "image_aug", "label")} for next_b in (next(it) for _ in range(n))]


def _profile_text(rows: dict[str, list], top: int = 25, names: tuple[str, str] = ("blindnet", "two_view_ce")) -> str:
    """Top operators of each of the two profiled steps, the objective's labelled ranges
    ("blindseg/...": forward time inside each loss term), and the per-operator difference."""
    lines = []
    for name in names:
        r = sorted(rows[name], key=lambda x: -x[1])[:top]
        total = sum(x[1] for x in rows[name]) / 1e6
        lines.append(f"== {name}: top {top} operators by self CPU time (total self {total:.2f} s)")
        lines.append(f"{'operator':<48}{'self s':>9}{'total s':>9}{'calls':>8}")
        lines += [f"{k[:47]:<48}{s / 1e6:>9.3f}{t / 1e6:>9.3f}{c:>8}" for k, s, t, c in r]
        lines.append("")
    lines.append("== labelled ranges of the objective (forward only; total CPU time inside, s)")
    labels = sorted({k for name in names for k, *_ in rows[name] if k.startswith("blindseg/")})
    totals = {name: {k: t for k, _, t, _ in rows[name]} for name in names}
    lines.append(f"{'range':<48}" + "".join(f"{n[:10]:>11}" for n in names))
    lines += [f"{k:<48}" + "".join(f"{totals[n].get(k, 0) / 1e6:>11.3f}" for n in names) for k in labels]
    lines.append("")
    a = {k: s for k, s, _, _ in rows[names[0]]}
    c = {k: s for k, s, _, _ in rows[names[1]]}
    diff = sorted(((k, a.get(k, 0) - c.get(k, 0), a.get(k, 0), c.get(k, 0)) for k in set(a) | set(c)),
                  key=lambda x: -x[1])
    total = (sum(a.values()) - sum(c.values())) / 1e6
    lines.append(f"== where the difference goes: {names[0]} - {names[1]} self CPU time per operator "
                 f"(total {total:+.2f} s)")
    lines.append(f"{'operator':<48}{'diff s':>9}{names[0][:9]:>10}{names[1][:9]:>10}")
    lines += [f"{k[:47]:<48}{d / 1e6:>+9.3f}{x / 1e6:>10.3f}{y / 1e6:>10.3f}" for k, d, x, y in diff[:top]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="blindnet_r50_gta5")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--flops", action="store_true")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    over = [f"data.crop_size={args.crop}", f"data.batch_size={args.batch}", "model.pretrained=none",
            "model.require_pretrained=false"]
    if args.backbone:
        over.append(f"model.backbone={args.backbone}")
    cfg = load_config(args.config, overrides=over)
    out = Path(args.out or f"bench/results/step_overhead_{args.crop}.json")
    # the allocator settings `blindseg` starts its processes with (blindseg_dist/runtime_env.py);
    # the spawned workers inherit them. THP_MEM_ALLOC_ENABLE=0 in the environment measures without.
    runtime_env.apply_defaults()
    n_steps = args.warmup + args.rounds + 1
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        bpath = str(Path(tmp) / "batches.pt")
        torch.save(real_batches(cfg, n_steps, args.shards), bpath)
        pipes, procs = {}, []
        for name in NAMES:
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(b, cfg, name, bpath, args.threads), daemon=True)
            p.start()
            pipes[name], _ = a, procs.append(p)

        def call(name, cmd, arg=None):
            pipes[name].send((cmd, arg))
            return pipes[name].recv()

        try:
            for k in range(args.warmup):
                for name in NAMES:
                    call(name, "step", k)
            times = {n: [] for n in NAMES}
            faults = {n: [] for n in NAMES}
            for r in range(args.rounds):
                order = NAMES if r % 2 == 0 else NAMES[::-1]
                for name in order:
                    t, f = call(name, "step", args.warmup + r)
                    times[name].append(t)
                    faults[name].append(f)
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {times[n][-1]:.2f}s ({faults[n][-1] / 1e3:.0f}k faults)" for n in NAMES), flush=True)
            prof = {n: call(n, "profile", n_steps - 1) for n in ("blindnet", "two_view_ce")} if args.profile else None
            flops = {n: call(n, "flops") for n in NAMES} if args.flops else None
        finally:
            for name in NAMES:
                try:
                    call(name, "stop")
                except (EOFError, BrokenPipeError, OSError):
                    pass
            for p in procs:
                p.join(timeout=30)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = med["blindnet"] / med["two_view_ce"]
    per_round = [a / b for a, b in zip(times["blindnet"], times["two_view_ce"])]
    print(f"\n{cfg.model.backbone} crop {args.crop}, {args.batch} images, {args.threads} threads, one process per "
          f"configuration, real two-view batches, median of {args.rounds} alternating rounds after {args.warmup} "
          f"warm-up (shared machine)")
    print(f"{'configuration':<16}{'step s':>9}{'/ two-view CE':>15}{'/ single view':>15}")
    for n in NAMES:
        print(f"{n:<16}{med[n]:>9.2f}{med[n] / med['two_view_ce']:>15.3f}{med[n] / med['single_view']:>15.3f}")
    ratio_rounds = statistics.median(per_round)
    ratio_min = min(times["blindnet"]) / min(times["two_view_ce"])
    print(f"BlindNet / two-view CE per round: {', '.join(f'{x:.3f}' for x in per_round)}; goal <= 1.10: "
          f"{'PASS' if ratio <= 1.10 else 'FAIL'} ({ratio:.3f}; median of the per-round ratios "
          f"{ratio_rounds:.3f}, fastest step against fastest step {ratio_min:.3f})")
    result = {"config": args.config, "backbone": cfg.model.backbone, "crop": args.crop, "batch_per_process": args.batch,
              "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
              "data": args.shards or "synthetic GTA5-like scenes through the training loader",
              "median_step_s": med, "all_step_s": times, "minor_page_faults_per_step": faults,
              "env": {k: os.environ[k] for k in ENV_KNOBS if k in os.environ}, "ratio_per_round": per_round,
              "ratio_blindnet_vs_two_view_ce": ratio,
              "ratio_median_of_rounds": ratio_rounds, "ratio_of_fastest_steps": ratio_min,
              "ratio_blindnet_vs_single_view": med["blindnet"] / med["single_view"],
              "ratio_two_view_ce_vs_single_view": med["two_view_ce"] / med["single_view"],
              "goal": "ratio_blindnet_vs_two_view_ce <= 1.10", "pass": ratio <= 1.10}
    if flops is not None:
        result["fvcore_forward_flops"] = flops
        if all("total" in flops[n] for n in ("blindnet", "two_view_ce")):
            share = 1 - flops["two_view_ce"]["total"] / flops["blindnet"]["total"]
            result["loss_terms_share_of_forward_flops"] = share
            result["flops_limit_ratio"] = flops["blindnet"]["total"] / flops["two_view_ce"]["total"]
            print(f"fvcore forward FLOPs: blindnet {flops['blindnet']['total'] / 1e9:.1f} G, two-view CE "
                  f"{flops['two_view_ce']['total'] / 1e9:.1f} G, single view {flops['single_view'].get('total', 0) / 1e9:.1f} G"
                  f" -> projection heads + Gram + losses = {100 * share:.1f}% of the BlindNet forward "
                  f"(FLOP limit of the ratio {result['flops_limit_ratio']:.3f})")
        else:
            print(f"fvcore: {flops}")
    if prof is not None:
        text = _profile_text(prof)
        ptxt = out.with_name(out.stem.replace("step_overhead", "step_overhead_profile") + ".txt")
        atomic.write_text(ptxt, text)
        result["profile"] = str(ptxt)
        print(text)
    atomic.write_json(out, result, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
