"""Step overhead of the BlindNet losses on the CPU (issue "Faithful BlindNet").

Median step time (forward, backward, SGD step) of DeepLabV3+ with all four BlindNet losses against
the same two-view step with CE only (no projection heads, no CML/CCL/CWCL/SDCL), and against the
single-view baseline; configurations alternate within each round so machine noise hits all alike.

    .venv/bin/python bench/step_overhead.py [--backbone resnet50] [--crop 512] [--batch 2] [--rounds 5]

Prints a table and writes bench/results/step_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blindseg_dist.data.labels import IGNORE
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights

CONFIGS = {
    "blindnet (all four losses)": LossWeights(),
    "two-view CE only": LossWeights(cml=0, ccl=0, cwcl=0, sdcl=0),
    "single-view baseline": LossWeights(two_view=False, cml=0, ccl=0, cwcl=0, sdcl=0),
}


def make_step(name: str, w: LossWeights, backbone: str):
    torch.manual_seed(0)
    net = build_model(backbone, aux=w.aux > 0, proj_heads=w.two_view and (w.cwcl > 0 or w.sdcl > 0))
    obj = BlindNetObjective(net, w, run_seed=304).train()
    opt = torch.optim.SGD(obj.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(batch, i: int) -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = obj(batch["image"], batch["label"], batch["image_aug"], step=i)
        out["total"].backward()
        opt.step()
        return time.perf_counter() - t

    return step


def synthetic_batch(b: int, crop: int, classes: int = 19) -> dict:
    g = torch.Generator().manual_seed(0)
    # blocky labels with a realistic number of classes per image (contrastive sampling sees real work)
    coarse = torch.randint(0, classes, (b, crop // 32, crop // 32), generator=g)
    label = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)
    label[:, :8] = IGNORE
    return {
        "image": torch.randn(b, 3, crop, crop, generator=g),
        "image_aug": torch.randn(b, 3, crop, crop, generator=g),
        "label": label,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/step_overhead.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = synthetic_batch(args.batch, args.crop)
    steps = {name: make_step(name, w, args.backbone) for name, w in CONFIGS.items()}
    for name, step in steps.items():  # warm-up (allocator, first-call overheads)
        step(batch, 0)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step(batch, r + 1))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(' ')[0]} {times[n][-1]:.2f}s" for n in CONFIGS),
              flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    ref = med["two-view CE only"]
    base = med["single-view baseline"]
    rows = [(n, med[n], med[n] / ref, med[n] / base) for n in CONFIGS]
    print(f"\n{args.backbone} crop {args.crop}x{args.crop}, {args.batch} images/process, {torch.get_num_threads()} threads, "
          f"median of {args.rounds}")
    print(f"{'configuration':<30}{'step s':>9}{'/ two-view CE':>15}{'/ single view':>15}")
    for n, t, r1, r2 in rows:
        print(f"{n:<30}{t:>9.2f}{r1:>15.3f}{r2:>15.3f}")
    result = {
        "backbone": args.backbone, "crop": args.crop, "batch_per_process": args.batch, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "median_step_s": med, "all_step_s": times,
        "ratio_blindnet_vs_two_view_ce": med["blindnet (all four losses)"] / ref,
        "ratio_blindnet_vs_single_view": med["blindnet (all four losses)"] / base,
        "ratio_two_view_ce_vs_single_view": ref / base,
        "goal": "ratio_blindnet_vs_two_view_ce <= 1.10",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
