"""`blindseg ablate`: one training run per (grid entry, seed), each evaluated at its end, then a
table of mean ± std over seeds per target.

A grid is a YAML file (configs/ablation/<name>.yaml or any path) listing runs as config values on
top of the base config. Each run is an ordinary `blindseg train` in its own process (under
`accelerate launch` when processes > 1), so a crash stays inside its run; its output goes to
RUN/train.log. Layout: DIR/runs/<entry>/seed<i>/ (config.yaml, tb/, checkpoints/, eval.json),
DIR/ablation.md, DIR/ablation.csv (mean ± std per entry), DIR/ablation_runs.csv (one row per run).
Rerunning skips every run whose eval.json exists and rebuilds the tables. Each run's TensorBoard
folder gets the loss weights / scopes as hparams and the per-target mIoU as metrics, so
`tensorboard --logdir DIR/runs` shows the ablation in the HParams dashboard.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ..config import ConfigError, load_config, load_yaml, parse_overrides, shipped_configs
from ..launcher import blindseg_command, launch_env


@dataclass
class GridEntry:
    name: str
    """Row label of the table (e.g. "+CML")."""
    slug: str
    """Folder name of the entry's runs."""
    values: dict[str, Any]
    """Dotted config key -> value set for this entry."""


@dataclass
class PlannedRun:
    entry: GridEntry
    seed_index: int
    seed: int
    run_dir: Path
    overrides: list[str]
    config: str | None = None
    """Training config of this run (None: the plan's one config; `blindseg scale` sets one per run)."""


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug or "run"


def grid_path(grid: str | Path) -> Path:
    p = Path(grid)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"ablation grid file {str(p)!r} does not exist")
        return p
    grid_dir = shipped_configs() / "ablation"
    p = grid_dir / f"{grid}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in grid_dir.glob("*.yaml")) if grid_dir.is_dir() else []
        raise ConfigError(f"unknown ablation grid {str(grid)!r}; choose one of {known} or pass a YAML path")
    return p


def load_grid(grid: str | Path) -> tuple[str, list[GridEntry]]:
    """(description, entries) of a grid file: ``runs: [{name: str, set: {dotted.key: value}}, ...]``."""
    path = grid_path(grid)
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"ablation grid {str(path)!r} is not valid YAML: {e}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"ablation grid {str(path)!r}: needs a non-empty list 'runs' of {{name, set}} entries")
    entries, slugs = [], set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str) or not isinstance(run.get("set", {}), dict):
            raise ConfigError(f"ablation grid {str(path)!r}: runs[{i}] must be {{name: str, set: {{key: value}}}}")
        slug = str(run.get("id") or slugify(run["name"]))
        if slug in slugs:
            raise ConfigError(f"ablation grid {str(path)!r}: two runs share the folder name {slug!r}; "
                              "give one of them a distinct name or 'id'")
        slugs.add(slug)
        entries.append(GridEntry(run["name"], slug, dict(run.get("set") or {})))
    return str(data.get("description", path.stem)), entries


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _flat_keys(nested: dict) -> list[str]:
    """{"loss": {"cml": 0}} -> ["loss.cml"] (config keys are section.key)."""
    return [f"{sec}.{k}" for sec, d in nested.items() for k in (d if isinstance(d, dict) else {"": 0})]


def plan_runs(config: str | Path, entries: Sequence[GridEntry], seeds: int, output_dir: Path,
              overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Every (entry, seed) run with its overrides, each validated by loading its config."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1 seed")
    base = load_config(config, list(overrides))
    if not base.eval.targets:
        raise ConfigError("the ablation evaluates every run at its end, but eval.targets is empty; "
                          "set it in the config or as an override, e.g. 'eval.targets={night: DIR}'")
    user_keys = set(_flat_keys(parse_overrides(list(overrides))))
    plan = []
    for entry in entries:
        clash = sorted(user_keys & set(entry.values))
        if clash:
            raise ConfigError(f"override(s) {clash} clash with the grid entry {entry.name!r}, which sets them per run; "
                              "drop them from the command line or edit the grid")
        for i in range(seeds):
            seed = base.run.seed + i
            run_dir = output_dir / "runs" / entry.slug / f"seed{i}"
            ovr = [*overrides, *(_override(k, v) for k, v in entry.values.items()),
                   f"run.seed={seed}", "eval.at_end=true"]
            try:
                load_config(config, ovr)
            except ConfigError as e:
                raise ConfigError(f"grid entry {entry.name!r}: {e}") from None
            plan.append(PlannedRun(entry, i, seed, run_dir, ovr))
    return plan


def hparams_of(run: PlannedRun, cfg_dict: dict) -> dict[str, Any]:
    """The HParams of a run: entry, seed, every loss.* value (weights, scopes), steps, backbone."""
    hp: dict[str, Any] = {"entry": run.entry.name, "seed": run.seed}
    hp.update({f"loss.{k}": v for k, v in cfg_dict["loss"].items()})
    hp["optim.max_steps"] = cfg_dict["optim"]["max_steps"]
    hp["model.backbone"] = cfg_dict["model"]["backbone"]
    return hp


def metrics_of(targets: dict[str, dict]) -> dict[str, float]:
    m = {f"hparam/miou/{t}": r["miou"] for t, r in targets.items()}
    m.update({f"hparam/miou16/{t}": r["miou16"] for t, r in targets.items() if "miou16" in r})
    m["hparam/miou/mean"] = float(np.nanmean([r["miou"] for r in targets.values()]))
    return m


def write_hparams(run: PlannedRun, targets: dict[str, dict]) -> None:
    """add_hparams into RUN/tb once (RUN/hparams.json marks it done)."""
    from ..engine.logging import RunLogger

    marker = run.run_dir / "hparams.json"
    if marker.is_file():
        return
    cfg_dict = load_yaml((run.run_dir / "config.yaml").read_text())
    hp, metrics = hparams_of(run, cfg_dict), metrics_of(targets)
    logger = RunLogger(run.run_dir / "tb", enabled=True)
    logger.hparams(hp, metrics)
    logger.close()
    marker.write_text(json.dumps({"hparams": hp, "metrics": metrics}, indent=1))


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def build_tables(entries: Sequence[GridEntry], plan: Sequence[PlannedRun], results: dict[Path, dict],
                 output_dir: Path, description: str = "") -> str:
    """Write DIR/ablation.md, DIR/ablation.csv, DIR/ablation_runs.csv; return the markdown table."""
    import csv

    from .report import render

    targets: list[str] = []
    for res in results.values():
        targets += [t for t in res if t not in targets]
    cols16 = [t for t in targets if any("miou16" in res.get(t, {}) for res in results.values())]
    metrics = [(t, "miou") for t in targets] + [(t, "miou16") for t in cols16]
    names = [t if m == "miou" else f"{t} (16 cl.)" for t, m in metrics]
    header = ["run", "seeds", *names, "mean"]
    md_rows, csv_rows, per_run, bars = [], [], [], {}
    for entry in entries:
        runs = [r for r in plan if r.entry is entry and r.run_dir in results]
        row, crow = [entry.name, str(len(runs))], [entry.name, len(runs)]
        for t, m in metrics:
            ms = _mean_std([results[r.run_dir][t][m] for r in runs if t in results[r.run_dir]
                            and m in results[r.run_dir][t]])
            row.append(_fmt(*ms))
            crow += [f"{100 * v:.4f}" if not math.isnan(v) else "" for v in ms]
            bars.setdefault(entry.name, []).append(ms)
        ms = _mean_std([float(np.nanmean([res["miou"] for res in results[r.run_dir].values()])) for r in runs])
        row.append(_fmt(*ms))
        crow += [f"{100 * v:.4f}" if not math.isnan(v) else "" for v in ms]
        bars.setdefault(entry.name, []).append(ms)
        md_rows.append(row)
        csv_rows.append(crow)
        for r in runs:
            res = results[r.run_dir]
            per_run.append([entry.name, r.seed_index, r.seed, str(r.run_dir),
                            *[f"{100 * res[t][m]:.4f}" if t in res and m in res[t] else "" for t, m in metrics],
                            f"{100 * float(np.nanmean([v['miou'] for v in res.values()])):.4f}",
                            *_training_cells(r.run_dir)])
    table = render(header, md_rows, "markdown")
    n_seeds = max((r.seed_index for r in plan), default=0) + 1
    md = [f"# Ablation: {description}", "",
          f"mIoU (%), mean ± sample std (ddof=1) over {n_seeds} seed(s); 'mean' = mean over the targets "
          "per run, then over seeds. Each run: RUN/eval.json under runs/.", "", table, ""]
    (output_dir / "ablation.md").write_text("\n".join(md))
    with open(output_dir / "ablation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "seeds", *[f"{n} {s}" for n in [*names, "mean"] for s in ("mean", "std")]])
        w.writerows(csv_rows)
    with open(output_dir / "ablation_runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "seed_index", "seed", "run_dir", *names, "mean", "steps", "last_loss", "images_per_s"])
        w.writerows(per_run)
    plot_ablation(bars, [*names, "mean"], output_dir / "ablation.png", description)
    return table


def _training_cells(run_dir: Path) -> list[str]:
    """steps, last total loss and mean images/s of a run, from its metrics.jsonl ('' when absent)."""
    from ..engine.records import training_digest

    d = training_digest(run_dir)
    return [str(d.get("steps", "")), "" if d.get("last_loss") is None else f"{d['last_loss']:.4f}",
            "" if d.get("images_per_s") is None else f"{d['images_per_s']:.2f}"]


def plot_ablation(bars: dict[str, list[tuple[float, float]]], columns: Sequence[str], path: Path,
                  title: str = "") -> Path:
    """Grouped bars of mIoU (%) per target and the mean, one bar per grid entry, ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(columns))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(columns) * max(1, len(bars)) ** 0.5 + 2), 4.0))
    for i, (name, vals) in enumerate(bars.items()):
        mean = [100 * (0.0 if math.isnan(m) else m) for m, _ in vals]
        std = [100 * (0.0 if math.isnan(s) else s) for _, s in vals]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=name)
    ax.set_xticks(x, list(columns), rotation=20, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title or "ablation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _final_checkpoint(run: PlannedRun, config: str | None) -> tuple[Path | None, Any]:
    """(the run's checkpoint at optim.max_steps if it is complete, else None; the run's config)."""
    from ..engine import checkpoint as ckpt

    cfg = load_config(run.config or config, list(run.overrides))
    final = ckpt.checkpoint_dir(run.run_dir) / str(cfg.optim.max_steps)
    return (final if (final / ckpt.STATE_FILE).is_file() else None), cfg


def _eval_command(final: Path, cfg: Any, eval_json: Path, processes: int,
                  targets: dict[str, str] | None = None, max_images: int | None = None) -> list[str]:
    """`blindseg eval` of checkpoint ``final`` on the run's eval.targets (or ``targets``; its
    eval.max_images or ``max_images``; protocols and sliding window from the run's config), writing
    ``eval_json``."""
    targets = cfg.eval.targets if targets is None else targets
    max_images = cfg.eval.max_images if max_images is None else max_images
    return blindseg_command(["eval", "--checkpoint", str(final),
                             "--data", *[f"{k}={v}" for k, v in targets.items()],
                             "--json", str(eval_json), "--max-images", str(max_images)],
                            processes=processes)


def _run_logged(cmd: list[str], log_path: Path) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log_path``; (exit code, seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, env=launch_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def _map_runs(fn, items: Sequence, parallel: int):
    """fn over items, ``parallel`` at a time (threads that each wait on one subprocess), in order."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: need at least 1")
    if parallel == 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        yield from pool.map(fn, items)


def _run_one(run: PlannedRun, config: str | None, processes: int) -> tuple[str, str, int, float]:
    """Evaluate the run's final checkpoint when it exists (and eval.targets are set), else train it
    (`blindseg train --resume`); returns ("evaluated" | "trained", log file name, exit code, seconds)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    final, cfg = _final_checkpoint(run, config)
    if final is not None and cfg.eval.targets:
        done, logname = "evaluated", "eval.log"
        cmd = _eval_command(final, cfg, run.run_dir / "eval.json", processes)
    else:
        done, logname = "trained", "train.log"
        cmd = blindseg_command(["train", "--config", run.config or config, "--output-dir", str(run.run_dir),
                                "--resume", *run.overrides], processes=processes)
    rc, seconds = _run_logged(cmd, run.run_dir / logname)
    return done, logname, rc, seconds


def execute_plan(plan: Sequence[PlannedRun], config: str | None = None, *, processes: int = 1,
                 desc: str = "ablation", parallel: int = 1) -> tuple[dict[Path, dict], dict[str, list[str]]]:
    """Train and evaluate every planned run that has no RUN/eval.json yet (each an ordinary
    `blindseg train --resume` in its own process, output in RUN/train.log), skip the others. A run
    whose final checkpoint (at optim.max_steps) exists without eval.json (stopped after its last save)
    is only evaluated (`blindseg eval` of that checkpoint, output in RUN/eval.log), not trained.
    ``parallel`` runs go at once (e.g. two 1-thread runs on a 2-core machine).
    Returns ({run_dir: eval targets} of the runs with results,
    {"trained"|"evaluated"|"skipped"|"failed": [run_dir]})."""
    import threading

    from tqdm import tqdm

    results: dict[Path, dict] = {}
    status: dict[str, list[str]] = {"trained": [], "evaluated": [], "skipped": [], "failed": []}
    n = len(plan)
    bar = tqdm(total=n, desc=desc, unit="run", dynamic_ncols=True)
    lock = threading.Lock()

    def one(item: tuple[int, PlannedRun]) -> None:
        k, run = item
        label = f"[{k}/{n}] {run.entry.name} seed {run.seed_index}"
        eval_json = run.run_dir / "eval.json"
        if parallel == 1:
            bar.set_description(f"{run.entry.name} seed {run.seed_index}")
        if eval_json.is_file():
            state, seconds = "skipped", 0.0
        else:
            done, logname, rc, seconds = _run_one(run, config, processes)
            state = done if rc == 0 and eval_json.is_file() else "failed"
            if state == "failed":
                why = f"exit code {rc}" if rc else "no eval.json written"
                doing = "training" if done == "trained" else "evaluating the final checkpoint"
                with lock:
                    bar.write(f"{label}: {doing} ... FAILED ({why}, {seconds:.0f} s); log {run.run_dir / logname}:\n"
                              + _tail(run.run_dir / logname))
        with lock:
            status[state].append(str(run.run_dir))
            if state != "failed":
                targets = json.loads(eval_json.read_text())["targets"]
                results[run.run_dir] = targets
                write_hparams(run, targets)
                mean = 100 * float(np.nanmean([r["miou"] for r in targets.values()]))
                what = {"trained": "training ... done", "evaluated": "final checkpoint evaluated (no training)",
                        "skipped": "skipped (eval.json exists)"}[state]
                extra = f" in {seconds:.0f} s" if state != "skipped" else ""
                bar.write(f"{label}: {what} {mean:.1f} mIoU{extra}")
            bar.update(1)

    for _ in _map_runs(one, list(enumerate(plan, 1)), parallel):
        pass
    bar.close()
    results = {r.run_dir: results[r.run_dir] for r in plan if r.run_dir in results}  # plan order
    return results, status


def evaluate_extra(plan: Sequence[PlannedRun], name: str, targets: dict[str, str], config: str | None = None, *,
                   processes: int = 1, parallel: int = 1, max_images: int | None = None) -> dict[Path, dict]:
    """Evaluate the final checkpoint of every finished run on further targets (e.g. corrupted copies of
    the held-out set made after the runs trained): `blindseg eval` into RUN/eval-<name>.json (output in
    RUN/eval-<name>.log; at most ``max_images`` per target, default the run's eval.max_images),
    skipped where that file exists. Returns {run_dir: targets} of the runs that
    have it; a run without its final checkpoint is reported and left out."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"extra evaluation name {name!r}: use letters, digits, '_', '.', '-'")
    if not targets:
        raise ConfigError(f"extra evaluation {name!r}: no targets")
    out: dict[Path, dict] = {}

    def one(run: PlannedRun) -> None:
        path = run.run_dir / f"eval-{name}.json"
        if not path.is_file():
            final, cfg = _final_checkpoint(run, config)
            if final is None:
                print(f"[ablate] {run.run_dir}: no final checkpoint; not evaluated on {name!r}", flush=True)
                return
            log = run.run_dir / f"eval-{name}.log"
            rc, seconds = _run_logged(_eval_command(final, cfg, path, processes, targets, max_images), log)
            if rc != 0 or not path.is_file():
                print(f"[ablate] {run.run_dir}: evaluation on {name!r} FAILED (exit code {rc}); log {log}:\n"
                      + _tail(log), flush=True)
                return
            print(f"[ablate] {run.entry.name} seed {run.seed_index}: evaluated on {name!r} in {seconds:.0f} s",
                  flush=True)
        out[run.run_dir] = json.loads(path.read_text())["targets"]

    for _ in _map_runs(one, list(plan), parallel):
        pass
    return {r.run_dir: out[r.run_dir] for r in plan if r.run_dir in out}


def run_ablation(config: str | Path, seeds: int, *, grid: str | Path = "default", output_dir: str | Path = "ablation",
                 overrides: Sequence[str] = (), processes: int = 1, parallel: int = 1) -> dict:
    """Train and evaluate every (grid entry, seed) run that has no eval.json yet; write the tables."""
    if processes < 1:
        raise ConfigError(f"--processes {processes}: need at least 1")
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: need at least 1")
    description, entries = load_grid(grid)
    out = Path(output_dir).resolve()
    config = str(Path(config).resolve()) if Path(config).is_file() else str(config)
    plan = plan_runs(config, entries, seeds, out, overrides)
    out.mkdir(parents=True, exist_ok=True)
    results, status = execute_plan(plan, config, processes=processes, parallel=parallel)
    table = build_tables(entries, plan, results, out, description)
    print(table)
    print(f"[ablate] {len(status['trained'])} trained, {len(status['evaluated'])} evaluated only, "
          f"{len(status['skipped'])} skipped, "
          f"{len(status['failed'])} failed; tables {out / 'ablation.md'}, {out / 'ablation.csv'}; "
          f"TensorBoard HParams: tensorboard --logdir {out / 'runs'}")
    return {"output_dir": str(out), "table": table, **status}
