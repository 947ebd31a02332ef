"""Backbone scaling: parameters, inference GFLOPs, training step time and peak memory per config.

For each configs/scaling/*.yaml (or the --configs given), a fresh subprocess builds the BlindNet
training objective (all four losses, as configured), runs ``--warmup`` + ``--steps`` SGD steps on a
random two-view batch of ``--batch`` x ``--crop``^2 on the CPU and reports the mean time of the
timed steps and the peak resident memory (ru_maxrss, so one process per config) above the memory
after building the model (activations, gradients, optimizer state); then fvcore GFLOPs of the
inference network on one ``--flops-size`` image. Writes bench/results/scaling.json, a table, and
bench/results/scaling.png (step time and memory vs parameters).

    .venv/bin/python bench/scaling.py --crop 256 --batch 2 --steps 2 \
        --configs configs/scaling/resnet50.yaml configs/scaling/resnet101.yaml \
                  configs/scaling/convnext_tiny.yaml configs/scaling/swin_tiny.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_one(config: str, crop: int, batch: int, steps: int, warmup: int, flops_size: tuple[int, int],
                threads: int) -> dict:
    """One config, in this process (call it in a fresh process: ru_maxrss is a high-water mark)."""
    import torch

    from blindseg_dist.config import load_config, model_kwargs
    from blindseg_dist.model import build_model, count_parameters
    from blindseg_dist.model.objective import BlindNetObjective, LossWeights
    from blindseg_dist.tools.flops import compute_flops
    from dataclasses import asdict

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(config)
    kwargs = model_kwargs(cfg)
    net = build_model(**kwargs)
    counts = count_parameters(net)
    objective = BlindNetObjective(net, LossWeights(**asdict(cfg.loss)), run_seed=0).train()
    opt = torch.optim.SGD(objective.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, crop, crop, generator=g)
    image_aug = torch.randn(batch, 3, crop, crop, generator=g)
    # blocky labels (16 px cells) so every loss finds several classes with enough pixels
    cells = torch.randint(0, 19, (batch, crop // 16 + 1, crop // 16 + 1), generator=g)
    label = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :crop, :crop].contiguous()
    base_rss = _rss_mib()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = objective(image, label, image_aug, step=i)
        out["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        assert torch.isfinite(out["total"]), f"{config}: non-finite loss"
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    del objective, opt, net
    flops = compute_flops(kwargs, size=flops_size)
    return {
        "config": config,
        "backbone": cfg.model.backbone,
        "output_stride": cfg.model.output_stride,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "params_inference_m": counts["inference"] / 1e6,
        "params_training_m": sum(counts.values()) / 1e6,
        "gflops_inference": flops["model"]["inference"]["gflops"],
        "flops_size": list(flops_size),
        "train_crop": crop,
        "train_batch": batch,
        "step_s": sum(times) / len(times),
        "step_s_all": times,
        "peak_rss_mib": peak_rss,
        "train_mem_delta_mib": peak_rss - base_rss,
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'backbone':36s} {'ckpt':>4s} {'params(M)':>9s} {'GFLOPs':>8s} {'step(s)':>8s} {'peak RSS':>9s} {'train dMem':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['backbone']:36s} {'y' if r['grad_checkpointing'] else 'n':>4s} {r['params_inference_m']:9.1f} "
            f"{r['gflops_inference']:8.1f} {r['step_s']:8.2f} {r['peak_rss_mib']:8.0f}M {r['train_mem_delta_mib']:9.0f}M"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["params_inference_m"] for r in rows]
    for ax, key, label in ((axes[0], "step_s", "training step (s)"), (axes[1], "train_mem_delta_mib", "training memory above model (MiB)")):
        ax.scatter(x, [r[key] for r in rows])
        for r in rows:
            ax.annotate(r["backbone"].replace("timm:", "").split("_patch")[0], (r["params_inference_m"], r[key]),
                        fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("inference parameters (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    r0 = rows[0]
    fig.suptitle(f"BlindNet backbones on the CPU: batch {r0['train_batch']} x {r0['train_crop']}^2, two views, SGD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=sorted(str(c) for c in (ROOT / "configs/scaling").glob("*.yaml")))
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--flops-size", default="512x1024")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/scaling.json"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker mode: one config, JSON on stdout
    a = p.parse_args(argv)
    size = tuple(int(v) for v in a.flops_size.lower().split("x"))
    if a.one:
        print("RESULT " + json.dumps(measure_one(a.configs[0], a.crop, a.batch, a.steps, a.warmup, size, a.threads)))
        return 0
    rows = []
    for i, config in enumerate(a.configs, 1):
        print(f"[scaling] {i}/{len(a.configs)} {config}", flush=True)
        cmd = [sys.executable, __file__, "--one", "--configs", config, "--crop", str(a.crop), "--batch", str(a.batch),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--flops-size", a.flops_size, "--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            print(f"[scaling] {config} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: r["params_inference_m"])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU cores (shared), torch threads {a.threads}",
            "train": f"batch {a.batch} x {a.crop}x{a.crop}, two views, all losses, SGD, {a.warmup} warm-up + {a.steps} timed steps",
            "flops": f"fvcore, one {a.flops_size} image, eval-mode inference network"}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    table = format_table(rows)
    out.with_suffix(".txt").write_text(table + "\n")
    if rows:
        plot(rows, out.with_suffix(".png"))
    print(table)
    print(f"[scaling] {len(rows)}/{len(a.configs)} configs; wrote {out}, {out.with_suffix('.txt')}, {out.with_suffix('.png')}")
    return 0 if len(rows) == len(a.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
