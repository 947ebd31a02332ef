"""`blindseg scale`: a backbone scaling study. One training run per (config, seed), each evaluated at
its end (the run grid of `blindseg ablate`: tools/ablate.execute_plan, resumable: a run whose
eval.json exists is skipped), then a table and a plot of unseen-domain mIoU against parameters and
GFLOPs, with the measured training images/s and peak memory of each backbone.

Layout: DIR/runs/<config>/seed<i>/ (an ordinary run folder), DIR/runs/<config>/model.json (params
and fvcore GFLOPs at --flops-size, computed once), DIR/scaling.md, DIR/scaling.csv, DIR/scaling.png.
Unseen-domain mIoU of a run: the mean over its eval.targets that are not held-out source splits
(engine/evaluate.source_targets); mean ± std (ddof=1) over seeds. images/s: the mean of the logged
training throughput (all ranks) in RUN/metrics.jsonl; peak memory: the largest logged resident set
of rank 0 (and torch's peak CUDA allocation on a GPU), max over seeds.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import atomic
from ..config import ConfigError, find_config, load_config, model_kwargs, parse_overrides
from .ablate import GridEntry, PlannedRun, _flat_keys, _fmt, _mean_std, execute_plan, slugify


def plan_scaling(configs: Sequence[str], seeds: int, output_dir: Path,
                 overrides: Sequence[str] = ()) -> tuple[list[GridEntry], list[PlannedRun], dict[str, str]]:
    """(entries, planned runs, {entry slug: config path}), every run's config validated."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1 seed")
    if not configs:
        raise ConfigError("--configs: name at least one training config")
    if "run.seed" in _flat_keys(parse_overrides(list(overrides))):
        raise ConfigError("override run.seed clashes with --seeds (run.seed = the config's seed + i)")
    entries, plan, paths = [], [], {}
    for config in configs:
        path = str(find_config(config).resolve())
        name = Path(path).stem
        entry = GridEntry(name, slugify(name), {})
        if entry.slug in paths:
            raise ConfigError(f"--configs: {config!r} and another config share the folder name {entry.slug!r}")
        base = load_config(path, list(overrides))
        if not base.eval.targets:
            raise ConfigError(f"{config}: the study evaluates every run at its end, but eval.targets is empty; "
                              "set it in the config or as an override, e.g. 'eval.targets={night: DIR}'")
        paths[entry.slug] = path
        entries.append(entry)
        for i in range(seeds):
            ovr = [*overrides, f"run.seed={base.run.seed + i}", "eval.at_end=true"]
            load_config(path, ovr)
            plan.append(PlannedRun(entry, i, base.run.seed + i, output_dir / "runs" / entry.slug / f"seed{i}", ovr,
                                   config=path))
    return entries, plan, paths


def model_figures(config: str, overrides: Sequence[str], size: tuple[int, int], path: Path) -> dict[str, Any]:
    """Inference parameters and fvcore GFLOPs of a config's network at ``size`` (cached in ``path``)."""
    key = {"config": config, "overrides": list(overrides), "size": list(size)}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    from .flops import compute_flops

    cfg = load_config(config, list(overrides))
    res = compute_flops(model_kwargs(cfg), size=size)
    out = {"key": key, "backbone": cfg.model.backbone, "params": res["model"]["inference"]["params"],
           "gflops": res["model"]["inference"]["gflops"], "flops_size": list(size)}
    atomic.write_json(path, out, indent=1)
    return out


def run_figures(run: PlannedRun, targets: dict[str, dict]) -> dict[str, float]:
    """Unseen-domain mIoU, mean images/s and peak memory (MiB) of one finished run."""
    from ..engine.evaluate import source_targets
    from ..engine.records import METRICS_FILE, read_jsonl

    cfg = load_config(run.run_dir / "config.yaml")
    sources = set(source_targets(cfg.eval.targets, cfg.data.train))
    unseen = [t for t in targets if t not in sources]
    metrics = read_jsonl(run.run_dir / METRICS_FILE)
    ips = [m["images_per_s"] for m in metrics[1:] or metrics if m.get("images_per_s")]  # first log: warm-up
    rss = [m["memory/max_rss_mb"] for m in metrics if "memory/max_rss_mb" in m]
    cuda = [m["memory/cuda_max_allocated_mb"] for m in metrics if "memory/cuda_max_allocated_mb" in m]
    summary_file = run.run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    ckpt_dir = Path(summary["checkpoint"]) if summary.get("checkpoint") not in (None, "None") else None
    ckpt_mb = (sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file()) / 2**20
               if ckpt_dir is not None and ckpt_dir.is_dir() else float("nan"))
    return {"trained_params": summary.get("trainable_params", float("nan")),
            "total_params": summary.get("total_params", float("nan")), "checkpoint_mb": ckpt_mb,
            "unseen_miou": float(np.nanmean([targets[t]["miou"] for t in unseen])) if unseen else float("nan"),
            "unseen_targets": unseen,
            "images_per_s": float(np.mean(ips)) if ips else float("nan"),
            "peak_rss_mib": max(rss) if rss else float("nan"), "peak_cuda_mib": max(cuda) if cuda else float("nan")}


def build_scaling_tables(entries: Sequence[GridEntry], plan: Sequence[PlannedRun], results: dict[Path, dict],
                         figures: dict[str, dict], output_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """Write DIR/scaling.md, DIR/scaling.csv and DIR/scaling.png; return (markdown table, rows)."""
    from .report import render

    rows: list[dict[str, Any]] = []
    for entry in entries:
        runs = [r for r in plan if r.entry is entry and r.run_dir in results]
        per = [run_figures(r, results[r.run_dir]) for r in runs]
        mean, std = _mean_std([p["unseen_miou"] for p in per])
        fig = figures[entry.slug]
        rows.append({"backbone": entry.name, "model": fig["backbone"], "seeds": len(runs),
                     "params_m": fig["params"] / 1e6, "gflops": fig["gflops"], "unseen_miou": mean, "unseen_std": std,
                     "unseen_targets": sorted({t for p in per for t in p["unseen_targets"]}),
                     "images_per_s": float(np.nanmean([p["images_per_s"] for p in per])) if per else float("nan"),
                     "peak_rss_mib": max((p["peak_rss_mib"] for p in per), default=float("nan")),
                     "peak_cuda_mib": max((p["peak_cuda_mib"] for p in per), default=float("nan")),
                     "trained_params_m": per[0]["trained_params"] / 1e6 if per else float("nan"),
                     "total_params_m": per[0]["total_params"] / 1e6 if per else float("nan"),
                     "checkpoint_mb": max((p["checkpoint_mb"] for p in per), default=float("nan"))})
    size = "x".join(str(v) for v in next(iter(figures.values()))["flops_size"]) if figures else "?"
    header = ["backbone", "model", "seeds", "params (M)", f"GFLOPs @{size}", "unseen mIoU (%)", "images/s",
              "peak RSS (MiB)", "trained / total params (M)", "checkpoint (MB)"]

    def num(v: float, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    md_rows = [[r["backbone"], r["model"], str(r["seeds"]), num(r["params_m"], ".1f"), num(r["gflops"], ".1f"),
                _fmt(r["unseen_miou"], r["unseen_std"]), num(r["images_per_s"], ".1f"), num(r["peak_rss_mib"], ".0f"),
                f"{num(r['trained_params_m'], '.2f')} / {num(r['total_params_m'], '.2f')}", num(r["checkpoint_mb"], ".1f")]
               for r in rows]
    table = render(header, md_rows, "markdown")
    targets = sorted({t for r in rows for t in r["unseen_targets"]})
    md = ["# Backbone scaling", "",
          f"Unseen-domain mIoU (%): mean over the unseen targets ({', '.join(targets) or 'none'}) per run, then mean ± "
          "sample std over seeds. Parameters and GFLOPs (fvcore, one multiply-add = one FLOP) of the inference "
          "network; images/s and peak memory measured during training.", "", table, ""]
    atomic.write_text(output_dir / "scaling.md", "\n".join(md))
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["backbone", "model", "seeds", "params_m", "gflops", "unseen_miou", "unseen_std", "images_per_s",
            "peak_rss_mib", "peak_cuda_mib", "trained_params_m", "total_params_m", "checkpoint_mb"]
    w.writerow(cols)
    w.writerows([[r[c] for c in cols] for r in rows])
    atomic.write_text(output_dir / "scaling.csv", buf.getvalue())
    plot_scaling(rows, output_dir / "scaling.png", size)
    return table, rows


def plot_scaling(rows: list[dict[str, Any]], path: Path, size: str) -> Path:
    """Unseen-domain mIoU (± std over seeds) against parameters and against GFLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "params_m", "inference parameters (M)"), (axes[1], "gflops", f"GFLOPs @{size}")):
        for r in rows:
            m = 100 * (0.0 if math.isnan(r["unseen_miou"]) else r["unseen_miou"])
            s = 100 * (0.0 if math.isnan(r["unseen_std"]) else r["unseen_std"])
            ax.errorbar([r[key]], [m], yerr=[s], fmt="o", capsize=3)
            ax.annotate(r["backbone"], (r[key], m), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("unseen-domain mIoU (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Backbone scaling: unseen-domain mIoU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_scaling(configs: Sequence[str], seeds: int, *, output_dir: str | Path = "scaling",
                overrides: Sequence[str] = (), processes: int = 1, flops_size: tuple[int, int] = (512, 1024)) -> dict:
    """Train and evaluate every (config, seed) run without an eval.json; write the table and plot."""
    if processes < 1:
        raise ConfigError(f"--processes {processes}: need at least 1")
    out = Path(output_dir).resolve()
    entries, plan, paths = plan_scaling(configs, seeds, out, overrides)
    out.mkdir(parents=True, exist_ok=True)
    results, status = execute_plan(plan, processes=processes, desc="scaling")
    figures = {}
    for entry in entries:
        (out / "runs" / entry.slug).mkdir(parents=True, exist_ok=True)
        figures[entry.slug] = model_figures(paths[entry.slug], overrides, flops_size,
                                            out / "runs" / entry.slug / "model.json")
    table, rows = build_scaling_tables(entries, plan, results, figures, out)
    print(table)
    print(f"[scale] {len(status['trained'])} trained, {len(status['evaluated'])} evaluated only, "
          f"{len(status['skipped'])} skipped, {len(status['failed'])} failed; "
          f"{out / 'scaling.md'}, {out / 'scaling.csv'}, {out / 'scaling.png'}")
    return {"output_dir": str(out), "table": table, "rows": rows, **status}
