"""The run's file logs (docs/INTERFACES.md, "Run outputs"), written by rank 0, read by `blindseg report`
and `blindseg ablate` (no event-file parsing):

- ``DIR/metrics.jsonl``: one JSON object per logged step: ``step``, ``time`` (Unix seconds) and every
  scalar of the log hook (``loss/<term>``, ``lr``, ``grad_norm``, ``images_per_s``, ``time/data`` and
  ``time/step`` (seconds per step waiting for the loader, and computing),
  ``memory/max_rss_mb``, ``memory/cuda_max_allocated_mb`` on a GPU, ``faults/*``, ``comm_bytes/*``).
- ``DIR/eval.jsonl``: one object per evaluation during or at the end of training: ``step``,
  ``targets`` (name -> ``miou``, ``miou16`` for SYNTHIA, ``per_class_iou``), the ``selection``
  target and whether it is an unseen target.
- ``DIR/summary.csv`` (as timm's train.py writes it): one row per logged step, columns ``step``,
  ``lr``, ``loss/*``, ``grad_norm``, ``images_per_s``, then ``miou/<target>`` where that step was
  evaluated.

On a resume, rows after the resumed step are dropped (they are about to be trained again); a new
run in an empty folder starts both files afresh.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from .. import atomic

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
SUMMARY_CSV = "summary.csv"


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a .jsonl file ([] when absent); a torn last line (a killed writer) is dropped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        f.flush()


def truncate_after(path: str | Path, step: int) -> None:
    """Keep only the rows with ``step`` <= ``step`` (atomically; nothing to do when absent)."""
    p = Path(path)
    if p.is_file():
        kept = [r for r in read_jsonl(p) if int(r.get("step", 0)) <= step]
        atomic.write_text(p, "".join(json.dumps(r) + "\n" for r in kept))


def metrics_row(step: int, scalars: dict[str, float]) -> dict[str, Any]:
    return {"step": step, "time": time.time(), **scalars}


def eval_row(step: int, results: dict[str, dict], selection: str | None, unseen: bool) -> dict[str, Any]:
    targets = {name: {k: res[k] for k in ("miou", "miou16", "per_class_iou", "protocol") if k in res}
               for name, res in results.items()}
    return {"step": step, "time": time.time(), "targets": targets, "selection": selection,
            "selection_is_unseen_target": unseen}


TRAIN_COLUMNS = ("lr", "grad_norm", "images_per_s")


def summary_rows(metrics: Iterable[dict], evals: Iterable[dict]) -> list[dict[str, Any]]:
    """The rows of summary.csv: one per logged step, joined with the evaluations of that step."""
    by_step: dict[int, dict[str, Any]] = {}
    for m in metrics:
        row = {"step": m["step"]}
        row.update({k: m[k] for k in TRAIN_COLUMNS if k in m})
        row.update({k: v for k, v in m.items() if k.startswith("loss/")})
        by_step[int(m["step"])] = row
    for e in evals:
        row = by_step.setdefault(int(e["step"]), {"step": e["step"]})
        row.update({f"miou/{t}": r.get("miou") for t, r in e["targets"].items()})
    return [by_step[s] for s in sorted(by_step)]


def write_summary_csv(run_dir: str | Path) -> Path:
    """DIR/summary.csv from DIR/metrics.jsonl and DIR/eval.jsonl."""
    d = Path(run_dir)
    rows = summary_rows(read_jsonl(d / METRICS_FILE), read_jsonl(d / EVAL_FILE))
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return atomic.write_text(d / SUMMARY_CSV, buf.getvalue())


def training_digest(run_dir: str | Path) -> dict[str, Any]:
    """What `blindseg report` shows of a run's training from its metrics.jsonl/eval.jsonl: steps,
    last total loss, mean images/s, the best evaluation (``best_step``, ``selection``, labelled when
    the selection target is an unseen one). {} without metrics.jsonl."""
    d = Path(run_dir)
    metrics = read_jsonl(d / METRICS_FILE)
    if not metrics:
        return {}
    ips = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
    out: dict[str, Any] = {"steps": metrics[-1]["step"], "last_loss": metrics[-1].get("loss/total"),
                           "images_per_s": sum(ips) / len(ips) if ips else None}
    best = d / "best.json"
    if best.is_file():
        b = json.loads(best.read_text())
        out.update(best_step=b.get("step"), selection=b.get("selection"),
                   selection_is_unseen_target=b.get("selection_is_unseen_target", False))
    return out
