"""Result tables: `blindseg report`, `blindseg ablate` and the demo's closing table share this code.

A run is a folder holding ``report.json`` (the demo) or ``eval.json`` (training / `blindseg eval`),
or one of those files, or a training folder evaluated only during training (``eval.jsonl``: the
best checkpoint's evaluation). Where a run folder has ``metrics.jsonl`` (engine/records.py), a second
table shows its training: steps, last loss, images/s, best step and the selection target. The comparison table has one row per run: mIoU (%) per target (and mIoU16
for SYNTHIA targets), the mean over the run's unseen targets (all targets when it names none),
and, for `blindseg report`, fvcore parameters and GFLOPs of the run's network. A corrupted family
(`blindseg corrupt`, evaluated set by set) is one column, its mPC; its grouped table (mIoU per corruption
and severity, mPC, relative robustness) follows the per-class tables.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.labels import CLASS_NAMES

FLOPS_SIZE = (512, 1024)


@dataclass
class RunResult:
    """The evaluation record of one run."""

    name: str
    targets: dict[str, dict]
    unseen: list[str] | None = None
    path: Path | None = None
    config: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    corruptions: dict[str, dict] = field(default_factory=dict)  # corrupted families (engine.evaluate.corruption_groups)

    def members(self) -> set[str]:
        """The targets that are sets of a corrupted family (shown through the family's mPC)."""
        return {t for t in self.targets for fam in self.corruptions if t.startswith(fam + "/")}

    def columns(self) -> dict[str, float | None]:
        """mIoU per target, each corrupted family as one value (its mPC) in place of its sets."""
        members = self.members()
        cols = {t: r["miou"] for t, r in self.targets.items() if t not in members}
        cols.update({f"{fam} mPC": g["mpc"] for fam, g in self.corruptions.items()})
        return cols

    def mean(self) -> float:
        members = self.members()
        vals = [self.targets[k]["miou"] for k in (self.unseen or list(self.targets))
                if k in self.targets and k not in members]
        vals += [g["mpc"] for fam, g in self.corruptions.items() if not self.unseen or fam in self.unseen]
        return float(np.nanmean(vals)) if vals else float("nan")


def run_from_report(report: dict, name: str, path: Path | None = None) -> RunResult:
    """A RunResult from an eval.json / report.json dict."""
    if not isinstance(report.get("targets"), dict):
        raise ValueError(f"run {name!r}: the result file has no 'targets' mapping (not an eval.json / report.json)")
    config = Path(report["config"]) if report.get("config") else None
    if config is None and path is not None and (path / "config.yaml").is_file():
        config = path / "config.yaml"
    info = {k: report[k] for k in ("world_size", "checkpoint") if k in report}
    return RunResult(name=name, targets=report["targets"], unseen=report.get("unseen"), path=path,
                     config=config, info=info, corruptions=report.get("corruptions") or {})


def load_run(path: str | Path, name: str | None = None) -> RunResult:
    """Read RUN_DIR/report.json or RUN_DIR/eval.json (or that file itself)."""
    p = Path(path)
    if p.is_file():
        file, folder = p, p.parent
    elif p.is_dir():
        cands = [p / "report.json", p / "eval.json"]
        file = next((c for c in cands if c.is_file()), None)
        if file is None and (p / "eval.jsonl").is_file():
            return _run_from_eval_records(p, name or p.resolve().name)
        if file is None:
            raise FileNotFoundError(f"run folder {str(p)!r} holds neither report.json nor eval.json; pass a "
                                    "training run folder (evaluated at its end) or a `blindseg demo` output folder")
        folder = p
    else:
        raise FileNotFoundError(f"run {str(p)!r} does not exist")
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    return run_from_report(data, name or folder.resolve().name, folder)


def _run_from_eval_records(folder: Path, name: str) -> RunResult:
    """A run evaluated during training only (eval.every, no eval.json): the evaluation of its best
    checkpoint (DIR/best.json), else its last evaluation, from DIR/eval.jsonl."""
    from ..engine.records import read_jsonl

    rows = read_jsonl(folder / "eval.jsonl")
    if not rows:
        raise ValueError(f"run {name!r}: {folder / 'eval.jsonl'} holds no evaluation")
    best = json.loads((folder / "best.json").read_text()) if (folder / "best.json").is_file() else {}
    row = next((r for r in rows if r["step"] == best.get("step")), rows[-1])
    config = folder / "config.yaml" if (folder / "config.yaml").is_file() else None
    return RunResult(name=name, targets=row["targets"], path=folder, config=config,
                     info={"eval_step": row["step"], "from": "eval.jsonl"})


def training_table(runs: Sequence[RunResult]) -> tuple[list[str], list[list]] | None:
    """(header, rows) of what each run's metrics.jsonl / eval.jsonl / best.json say about its training
    (steps, last loss, images/s, best step and selection target, labelled when unseen); None when no
    run has metrics.jsonl."""
    from ..engine.records import training_digest

    digests = [(r, training_digest(r.path)) if r.path is not None else (r, {}) for r in runs]
    if not any(d for _, d in digests):
        return None
    header = ["run", "steps", "last loss", "images/s", "best step", "selected on"]
    rows = []
    for r, d in digests:
        sel = d.get("selection")
        if sel and d.get("selection_is_unseen_target"):
            sel = f"{sel} (UNSEEN target)"
        fmt = lambda v, f: "-" if v is None else format(v, f)
        rows.append([r.name, str(d.get("steps", "-")), fmt(d.get("last_loss"), ".4f"), fmt(d.get("images_per_s"), ".1f"),
                     str(d.get("best_step", "-")), sel or "-"])
    return header, rows


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Short run names: the folder name, or more of the path where two runs share it."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, pp in enumerate(parts):
        for k in range(1, len(pp) + 1):
            cand = "/".join(pp[-k:])
            if all("/".join(q[-k:]) != cand for j, q in enumerate(parts) if j != i):
                break
        names.append(cand)
    return names


# ---------------------------------------------------------------- tables (text, markdown, csv)

def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def comparison_table(runs: Sequence[RunResult], flops: dict[str, dict] | None = None) -> tuple[list[str], list[list]]:
    """(header, rows) of the comparison: run, mIoU per target (+ mIoU16 for SYNTHIA), mean, [FLOPs].

    Cells are numbers (fractions for mIoU, None where missing) or strings; formatting is left to
    ``render``.
    """
    targets: list[str] = []
    for r in runs:
        targets += [t for t in r.columns() if t not in targets]
    has16 = [t for t in targets if any("miou16" in r.targets.get(t, {}) for r in runs)]
    mean_name = "mean unseen" if runs and all(r.unseen for r in runs) else "mean"
    header = ["run", *targets, *[f"{t} (16 cl.)" for t in has16], mean_name]
    if flops:
        size = next((f["size"] for f in flops.values() if f), list(FLOPS_SIZE))
        header += ["params (M)", f"GFLOPs @{size[0]}x{size[1]}"]
    rows = []
    for r in runs:
        row: list = [r.name]
        cols = r.columns()
        row += [cols.get(t) for t in targets]
        row += [r.targets.get(t, {}).get("miou16") for t in has16]
        row.append(r.mean())
        if flops:
            f = flops.get(r.name)
            row += [f"{f['params'] / 1e6:.2f}" if f else "-", f"{f['gflops']:.1f}" if f else "-"]
        rows.append(row)
    return header, rows


def _cell(v, percent: bool = True) -> str:
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    return _pct(v) if percent else f"{v:.4f}"


def render(header: list[str], rows: list[list], fmt: str = "text") -> str:
    """The table as aligned text, markdown or CSV (CSV keeps mIoU as % with 4 decimals)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else (f"{100 * v:.4f}" if isinstance(v, float) else v) for v in row])
        return buf.getvalue()
    cells = [[_cell(v) for v in row] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    fmt_row = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths), *(fmt_row(r) for r in cells)])


def per_class_table(targets: dict[str, dict]) -> str:
    """IoU (%) per class (rows) and target (columns); '-' where a class never occurs."""
    names = list(targets)
    head = f"{'class':<14}" + "".join(f"{n[:12]:>13}" for n in names)
    rows = [head]
    for c in CLASS_NAMES:
        vals = [targets[n]["per_class_iou"].get(c) for n in names]
        if all(v is None for v in vals):
            continue
        rows.append(f"{c:<14}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>13}" for v in vals))
    return "\n".join(rows)


def _report_name(report: dict) -> str:
    if report.get("config"):
        return Path(report["config"]).resolve().parent.parent.name or "run"
    return "run"


def print_report(report: dict) -> None:
    """The demo's closing report (the same table as `blindseg report DEMO_DIR`)."""
    print()
    print(f"Results (world size {report['world_size']}, checkpoint {report['checkpoint']}); mIoU %")
    run = run_from_report(report, _report_name(report))
    print(render(*comparison_table([run])))
    print()
    print(per_class_table(report["targets"]))
    if run.corruptions:
        from ..engine.evaluate import format_corruption_table

        print()
        print(format_corruption_table(run.corruptions))
    if "timings" in report:
        t = report["timings"]
        print("\ntime: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()))


# ---------------------------------------------------------------- FLOPs, chart, `blindseg report`

def run_flops(run: RunResult, size: tuple[int, int] = FLOPS_SIZE) -> dict | None:
    """fvcore params and GFLOPs of the run's inference network at ``size``, cached in RUN_DIR/flops.json;
    None when the run has no config.yaml."""
    from ..config import load_config, model_kwargs
    from .flops import CONVENTION, compute_flops

    if run.config is None or not Path(run.config).is_file():
        return None
    kwargs = model_kwargs(load_config(run.config))
    kwargs["pretrained"] = None
    # through JSON once, so that tuples in the kwargs compare equal to the lists read back from the cache
    key = json.loads(json.dumps({"size": [int(size[0]), int(size[1])], "model_kwargs": kwargs}))
    cache = run.path / "flops.json" if run.path is not None else None
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached["value"]
        except (ValueError, KeyError):
            pass
    res = compute_flops(kwargs, size=size)
    value = {"size": key["size"], "params": res["model"]["inference"]["params"],
             "gflops": res["model"]["inference"]["gflops"], "convention": CONVENTION}
    if cache is not None:
        try:
            cache.write_text(json.dumps({"key": key, "value": value}, indent=1))
        except OSError:
            pass  # a read-only run folder: no cache
    return value


def bar_chart(runs: Sequence[RunResult], path: str | Path, title: str = "mIoU per target") -> Path:
    """Grouped bars: mIoU (%) per target and the mean, one bar per run (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = comparison_table(runs)
    cols = header[1:]
    x = np.arange(len(cols))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * max(1, len(rows)) ** 0.5 + 2), 4.0))
    for i, row in enumerate(rows):
        vals = [100 * v if isinstance(v, float) and not math.isnan(v) else 0.0 for v in row[1:]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=row[0])
    ax.set_xticks(x, cols, rotation=20, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, flops_size: tuple[int, int] | None = FLOPS_SIZE,
                 progress: bool = True) -> dict:
    """`blindseg report`: print and write OUT/report.md, OUT/report.csv and OUT/report.png."""
    if not run_dirs:
        raise ValueError("blindseg report: pass at least one RUN_DIR")
    runs = [load_run(p, n) for p, n in zip(run_dirs, unique_names(run_dirs))]
    flops = None
    if flops_size is not None:
        flops = {}
        for r in runs:
            if progress:
                print(f"[report] fvcore FLOPs of {r.name} at {flops_size[0]}x{flops_size[1]} ...", flush=True)
            flops[r.name] = run_flops(r, flops_size)
    header, rows = comparison_table(runs, flops)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = render(header, rows)
    md = ["# Run comparison", "", "mIoU (%); mean over each run's unseen targets (all targets when it names none).",
          "", render(header, rows, "markdown"), ""]
    if flops:
        md += [f"Params and GFLOPs: inference network, fvcore (one multiply-add = one FLOP), one "
               f"{flops_size[0]}x{flops_size[1]} image.", ""]
    md += ["![mIoU per target](report.png)", ""]
    from ..engine.evaluate import per_class_markdown

    for r in runs:
        md += [f"## {r.name}: IoU per class (%)", "", per_class_markdown(r.targets), ""]
    from ..engine.evaluate import format_corruption_table

    for r in runs:
        if r.corruptions:  # the grouped tables of its corrupted families
            md += [f"## {r.name}: corruptions", "", format_corruption_table(r.corruptions, "markdown"), ""]
            text += "\n\n" + f"{r.name}: " + format_corruption_table(r.corruptions)
    training = training_table(runs)
    if training is not None:
        md += ["## Training (metrics.jsonl, eval.jsonl, best.json)", "", render(*training, "markdown"), ""]
        text += "\n\n" + render(*training)
    (out / "report.md").write_text("\n".join(md))
    (out / "report.csv").write_text(render(header, rows, "csv"))
    chart = bar_chart(runs, out / "report.png")
    print(text)
    print(f"[report] wrote {out / 'report.md'}, {out / 'report.csv'}, {chart}")
    return {"header": header, "rows": rows, "out": str(out)}
