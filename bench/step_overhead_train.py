"""BlindNet step / two-view CE step measured through `blindseg train` itself, the way a user meets it
(docs/BENCHMARKS.md, "What a BlindNet step costs"); bench/step_overhead.py measures the same steps built from the
trainer's pieces, with a profile.

Each round runs `blindseg train` once per configuration (BlindNet; the same two-view step with CE
only; the single-view baseline), in that order or reversed (alternating rounds), on the same
synthetic GTA5-like shards, with the shipped recipe's model and losses at the given crop and batch,
one process, `run.threads` threads, one loader worker, no evaluation. The step time of a run is the
median over its logged steps after the warm-up (`batch / images_per_s` of metrics.jsonl, logged every
step); the ratio of a round is BlindNet / two-view CE.

    .venv/bin/python bench/step_overhead_train.py [--crop 512] [--batch 2] [--rounds 3] [--steps 6]
        [--warmup 2] [--threads 2] [--config blindnet_r50_gta5] [--backbone NAME] [--names a,b,c]

Writes bench/results/step_overhead_train_<crop>.json. THP_MEM_ALLOC_ENABLE=0 in the environment
measures without the allocator default `blindseg` sets (blindseg_dist/runtime_env.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blindseg_dist import atomic, runtime_env

CONFIGS = {
    "blindnet": [],
    "two_view_ce": ["loss.cml=0", "loss.ccl=0", "loss.cwcl=0", "loss.sdcl=0"],
    "single_view": ["loss.two_view=false", "loss.cml=0", "loss.ccl=0", "loss.cwcl=0", "loss.sdcl=0"],
}


def _shards(tmp: Path, crop: int) -> str:
    from blindseg_dist.data import synth
    from blindseg_dist.data.shards import write_shards
    from blindseg_dist.data.sources import get_source

    synth.generate(tmp / "raw", domains=1, images_per_domain=16, size=(crop, 2 * crop), seed=0, progress=False)
    write_shards(get_source("gta5", str(tmp / "raw" / "gta5")), str(tmp / "shards"), samples_per_shard=4,
                 progress=False, min_shards=1)
    return str(tmp / "shards")


def _run(args, name: str, shards: str, out_dir: Path, env: dict) -> dict:
    over = [f"data.train={shards}", f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
            "data.num_workers=1", "model.pretrained=none", "model.require_pretrained=false",
            f"optim.max_steps={args.warmup + args.steps}", "run.log_every=1", "run.checkpoint_every=1000000",
            f"run.threads={args.threads}", "eval.targets={}", *CONFIGS[name]]
    if args.backbone:
        over.append(f"model.backbone={args.backbone}")
    cmd = [sys.executable, "-m", "blindseg_dist", "train", "--config", args.config, "--output-dir", str(out_dir), *over]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: blindseg train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [args.batch / r["images_per_s"] for r in rows if r["step"] > args.warmup and r.get("images_per_s")]
    if len(steps) < args.steps:
        raise SystemExit(f"{name}: {len(steps)} timed steps in {out_dir / 'metrics.jsonl'}, expected {args.steps}")
    return {"median_step_s": statistics.median(steps), "step_s": steps, "wall_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="blindnet_r50_gta5")
    ap.add_argument("--backbone", default=None, help="default: the config's")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--names", default="blindnet,two_view_ce,single_view")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = args.names.split(",")
    if "blindnet" not in names or "two_view_ce" not in names or set(names) - set(CONFIGS):
        raise SystemExit(f"--names: blindnet and two_view_ce, optionally single_view; got {args.names}")
    out = Path(args.out or f"bench/results/step_overhead_train_{args.crop}.json")
    runs = {n: [] for n in names}
    # every run's environment: blindseg's defaults (what it would set itself) and the thread count
    env = runtime_env.apply_defaults(dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    with tempfile.TemporaryDirectory() as tmp:
        shards = _shards(Path(tmp), args.crop)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[name].append(_run(args, name, shards, Path(tmp) / f"{name}-{r}", env))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {runs[n][-1]['median_step_s']:.2f}s" for n in names)
                  + f"; BlindNet / two-view CE {runs['blindnet'][-1]['median_step_s'] / runs['two_view_ce'][-1]['median_step_s']:.3f}",
                  flush=True)
    med = {n: statistics.median(x["median_step_s"] for x in v) for n, v in runs.items()}
    per_round = [a["median_step_s"] / b["median_step_s"] for a, b in zip(runs["blindnet"], runs["two_view_ce"])]
    ratio = med["blindnet"] / med["two_view_ce"]
    print(f"\n`blindseg train`, {args.config} at crop {args.crop}, {args.batch} images, {args.threads} threads, "
          f"median step of steps {args.warmup + 1}-{args.warmup + args.steps} of each run, {args.rounds} alternating rounds")
    print(f"{'configuration':<16}{'step s':>9}{'/ two-view CE':>15}")
    for n in names:
        print(f"{n:<16}{med[n]:>9.2f}{med[n] / med['two_view_ce']:>15.3f}")
    print(f"BlindNet / two-view CE per round: {', '.join(f'{x:.3f}' for x in per_round)}; "
          f"goal <= 1.10: {'PASS' if ratio <= 1.10 else 'FAIL'} ({ratio:.3f})")
    atomic.write_json(out, {"config": args.config, "crop": args.crop, "batch_per_process": args.batch,
                            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                            "env": {k: env[k] for k in runtime_env.DEFAULTS},
                            "median_step_s": med, "runs": runs, "ratio_per_round": per_round,
                            "ratio_blindnet_vs_two_view_ce": ratio, "goal": "<= 1.10", "pass": ratio <= 1.10}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
