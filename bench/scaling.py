"""Backbone scaling: parameters, inference GFLOPs, training step time and peak memory per config.

For each configs/scaling/*.yaml (or the --configs given), a fresh subprocess builds the BlindNet
training objective (all four losses, as configured), runs ``--warmup`` + ``--steps`` steps of the
config's optimizer (engine/optim.build_optimizer: SGD or AdamW) on a random two-view batch of ``--batch`` x ``--crop``^2 on the CPU and reports the mean time of the
timed steps and the peak resident memory (ru_maxrss, so one process per config) above the memory
after building the model (activations, gradients, optimizer state); then fvcore GFLOPs of the
inference network on one image of each ``--flops-size`` size. ``--ckpt-saving`` measures every config
again with model.grad_checkpointing flipped (the activation memory checkpointing saves and its
time). ``--computed CONFIG ...`` adds figures computed without training, for models too large for
this machine: parameters (trainable / frozen), meta-device multiply-adds at ``--computed-sizes`` and
weight + gradient + optimizer bytes per GPU for ZeRO stages 0-3 (tools/flops.zero_memory_bytes).
Writes the JSON (``--out``), a table (.txt) and a plot (.png: step time and memory vs parameters).

    .venv/bin/python bench/scaling.py --configs configs/scaling/vit_small.yaml --crop 64 --batch 2 \
        --steps 2 --flops-size 512x1024 --ckpt-saving --computed configs/scaling/vit_large.yaml \
        --out bench/results/scaling_vit.json

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


def measure_one(config: str, crop: int, batch: int, steps: int, warmup: int, flops_sizes: list[tuple[int, int]],
                threads: int, overrides: list[str] | None = None) -> dict:
    """One config, in this process (call it in a fresh process: ru_maxrss is a high-water mark).
    The optimizer is the config's recipe (engine/optim.build_optimizer: SGD or AdamW state)."""
    import torch

    from blindseg_dist.config import load_config, model_kwargs
    from blindseg_dist.engine.optim import build_optimizer
    from blindseg_dist.model import build_model, count_parameters
    from blindseg_dist.model.objective import BlindNetObjective, LossWeights
    from blindseg_dist.tools.flops import compute_flops
    from dataclasses import asdict

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(config, list(overrides or []))
    kwargs = model_kwargs(cfg)
    net = build_model(**kwargs)
    counts = count_parameters(net)
    objective = BlindNetObjective(net, LossWeights(**asdict(cfg.loss)), run_seed=0).train()
    opt, _ = build_optimizer(cfg, objective)
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
    # the checkpointing twin (an override) has the same network: its FLOPs are not counted again
    gflops = {f"{h}x{w}": compute_flops(kwargs, size=(h, w))["model"]["inference"]["gflops"] if not overrides
              else float("nan") for h, w in flops_sizes}
    return {
        "config": config,
        "overrides": list(overrides or []),
        "backbone": cfg.model.backbone,
        "optimizer": cfg.optim.optimizer,
        "output_stride": cfg.model.output_stride,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "params_inference_m": counts["inference"] / 1e6,
        "params_training_m": sum(counts.values()) / 1e6,
        "gflops_inference": next(iter(gflops.values())),
        "gflops": gflops,
        "flops_size": list(flops_sizes[0]),
        "train_crop": crop,
        "train_batch": batch,
        "step_s": sum(times) / len(times),
        "step_s_all": times,
        "peak_rss_mib": peak_rss,
        "train_mem_delta_mib": peak_rss - base_rss,
    }


def format_table(rows: list[dict]) -> str:
    sizes = list(rows[0].get("gflops", {"": 0})) if rows else []
    head = (f"{'backbone':36s} {'ckpt':>4s} {'params(M)':>9s} " + " ".join(f"{'G@' + sz:>12s}" for sz in sizes)
            + f" {'step(s)':>8s} {'peak RSS':>9s} {'train dMem':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        g = r.get("gflops", {"": r["gflops_inference"]})
        lines.append(
            f"{r['backbone']:36s} {'y' if r['grad_checkpointing'] else 'n':>4s} {r['params_inference_m']:9.1f} "
            + " ".join(f"{g[sz]:12.1f}" for sz in sizes)
            + f" {r['step_s']:8.2f} {r['peak_rss_mib']:8.0f}M {r['train_mem_delta_mib']:9.0f}M"
        )
    return "\n".join(lines)


def computed_one(config: str, sizes: list[tuple[int, int]], world: int) -> dict:
    """Figures of a config computed without training (for models too large for this machine): parameters
    (trainable / frozen), multiply-adds on the meta device at each size (tools/flops.meta_gmacs) and
    weight + gradient + optimizer bytes per GPU for ZeRO stages 0-3 on ``world`` GPUs in bf16."""
    import torch

    from blindseg_dist.config import load_config, model_kwargs
    from blindseg_dist.model import build_model
    from blindseg_dist.tools.flops import meta_gmacs, zero_memory_bytes

    cfg = load_config(config)
    kwargs = model_kwargs(cfg)
    with torch.device("meta"):
        net = build_model(**kwargs)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    return {"config": config, "backbone": cfg.model.backbone, "optimizer": cfg.optim.optimizer,
            "params_training_m": (trainable + frozen) / 1e6, "trainable_m": trainable / 1e6, "frozen_m": frozen / 1e6,
            "gmacs_meta": {f"{h}x{w}": meta_gmacs(kwargs, (h, w)) for h, w in sizes},
            "zero_gib_per_gpu": {k: v / 2**30 for k, v in zero_memory_bytes(
                trainable, frozen, world=world, optimizer=cfg.optim.optimizer, precision="bf16").items()},
            "world": world}


def format_computed(rows: list[dict]) -> str:
    if not rows:
        return ""
    sizes = list(rows[0]["gmacs_meta"])
    head = (f"{'backbone':36s} {'params(M)':>9s} {'frozen(M)':>9s} " + " ".join(f"{'G@' + sz:>12s}" for sz in sizes)
            + " " + " ".join(f"{'Z' + str(i) + ' GiB':>8s}" for i in range(4)))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backbone']:36s} {r['params_training_m']:9.1f} {r['frozen_m']:9.1f} "
                     + " ".join(f"{r['gmacs_meta'][sz]:12.1f}" for sz in sizes) + " "
                     + " ".join(f"{r['zero_gib_per_gpu'][f'stage{i}']:8.2f}" for i in range(4)))
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
    p.add_argument("--configs", nargs="+", default=sorted(str(c) for c in (ROOT / "configs/scaling").glob("*.yaml")
                                                          if not c.name.startswith("_")))
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--flops-size", default="512x1024,1024x2048", help="comma-separated HxW sizes of the GFLOPs counts")
    p.add_argument("--ckpt-saving", action="store_true",
                   help="also measure each config with model.grad_checkpointing flipped (the memory it saves)")
    p.add_argument("--computed", nargs="*", default=[], metavar="CONFIG",
                   help="configs whose figures are computed, not measured: params, meta-device GMACs at the "
                        "--flops-size sizes, ZeRO 0-3 bytes per GPU (--world GPUs, bf16)")
    p.add_argument("--computed-sizes", default="512x1024,1024x2048", help="comma-separated HxW sizes of --computed")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--override", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/scaling.json"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker mode: one config, JSON on stdout
    a = p.parse_args(argv)
    sizes = [tuple(int(v) for v in sz.lower().split("x")) for sz in a.flops_size.split(",")]
    if a.one:
        print("RESULT " + json.dumps(measure_one(a.configs[0], a.crop, a.batch, a.steps, a.warmup, sizes, a.threads,
                                                 a.override)))
        return 0
    jobs = [(c, []) for c in a.configs]
    if a.ckpt_saving:
        from blindseg_dist.config import load_config

        jobs += [(c, [f"model.grad_checkpointing={str(not load_config(c).model.grad_checkpointing).lower()}"])
                 for c in a.configs]
    rows = []
    for i, (config, ovr) in enumerate(jobs, 1):
        print(f"[scaling] {i}/{len(jobs)} {config} {' '.join(ovr)}", flush=True)
        cmd = [sys.executable, __file__, "--one", "--configs", config, "--crop", str(a.crop), "--batch", str(a.batch),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--flops-size", a.flops_size, "--threads", str(a.threads),
               "--override", *ovr]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            print(f"[scaling] {config} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: (r["params_inference_m"], r["grad_checkpointing"]))
    saving = []
    for r in rows:
        twin = next((q for q in rows if q["config"] == r["config"] and q["grad_checkpointing"] != r["grad_checkpointing"]), None)
        if twin is not None and r["grad_checkpointing"]:
            saving.append({"config": r["config"], "backbone": r["backbone"],
                           "train_mem_delta_mib_off": twin["train_mem_delta_mib"],
                           "train_mem_delta_mib_on": r["train_mem_delta_mib"],
                           "saving_mib": twin["train_mem_delta_mib"] - r["train_mem_delta_mib"],
                           "step_s_off": twin["step_s"], "step_s_on": r["step_s"]})
    csizes = [tuple(int(v) for v in sz.lower().split("x")) for sz in a.computed_sizes.split(",")]
    computed = [computed_one(c, csizes, a.world) for c in a.computed]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU cores (shared), torch threads {a.threads}",
            "train": f"batch {a.batch} x {a.crop}x{a.crop}, two views, all losses, the config's optimizer, "
                     f"{a.warmup} warm-up + {a.steps} timed steps",
            "flops": f"fvcore, one image of each of {a.flops_size}, eval-mode inference network",
            "computed": f"meta-device torch.utils.flop_counter multiply-adds at {a.computed_sizes}; ZeRO bytes per GPU on {a.world} GPUs, bf16, "
                        "weights + gradients + optimizer state (activations excluded)"}
    out.write_text(json.dumps({"meta": meta, "results": rows, "checkpointing_saving": saving, "computed": computed},
                              indent=1))
    table = format_table(rows) if rows else ""
    text = table + ("\n\ncomputed (not measured):\n" + format_computed(computed) if computed else "")
    out.with_suffix(".txt").write_text(text + "\n")
    if rows:
        plot(rows, out.with_suffix(".png"))
    print(text)
    for sv in saving:
        print(f"[scaling] checkpointing {sv['backbone']}: training memory {sv['train_mem_delta_mib_off']:.0f} -> "
              f"{sv['train_mem_delta_mib_on']:.0f} MiB, step {sv['step_s_off']:.2f} -> {sv['step_s_on']:.2f} s")
    print(f"[scaling] {len(rows)}/{len(jobs)} runs, {len(computed)} computed; wrote {out}, {out.with_suffix('.txt')}")
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
