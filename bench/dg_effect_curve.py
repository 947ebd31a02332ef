"""The effect experiment across settings: each arm's paired gain over the baseline against the number of
steps and the starting weights, from several bench/dg_effect.py results (docs/BENCHMARKS.md, "Does the
method beat the baseline?").

Every input is one dg_effect.py result JSON (one setting: steps, init, seeds, arms). The table has one
row per (setting, arm): mean unseen mIoU, the paired gain over that setting's baseline with its standard
error, the same on the corrupted and the clean held-out source frames, and, for the arms with extra
losses, their paired gain over two-view CE on the unseen domains: what the losses add once the second
view is there (the gain over the baseline is the second view's part plus that). The chart draws the unseen gain
with +-1 standard error against the steps, one line per (init, arm), so the whole curve is shown, not
its best point.

    python bench/dg_effect_curve.py bench/results/dg_effect.json bench/results/dg_effect_rand300.json \\
        bench/results/dg_effect_src300.json --out bench/results/dg_effect_curve.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("unseen", "corruption", "source")
TWO_VIEW = "two-view CE"


def paired_gain(arm: dict, ref: dict) -> tuple[float | None, float | None]:
    """Mean and standard error of the per-seed differences arm - ref ({seed: mIoU} each)."""
    seeds = sorted(set(arm) & set(ref))
    d = np.array([arm[k] - ref[k] for k in seeds])
    if len(d) == 0:
        return None, None
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def settings_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        r = json.loads(p.read_text())
        s = r["setting"]
        init = "random" if s["init"] == "random" else "source"
        for arm, u in r["summary"]["unseen"].items():
            row = {"result": str(p), "steps": s["steps"], "init": init, "init_detail": s["init"], "arm": arm,
                   "seeds": u["n"], "unseen_mean": u["mean"], "unseen_std": u["std"]}
            for g in GROUPS:
                pg = r["summary"].get(g, {}).get(arm, {}).get("paired_gain")
                row[f"{g}_gain"] = pg["gain"] if pg else None
                row[f"{g}_se"] = pg["se"] if pg else None
            two = r["summary"]["unseen"].get(TWO_VIEW)
            row["unseen_over_two_view"], row["unseen_over_two_view_se"] = (
                paired_gain(u["per_seed"], two["per_seed"]) if two and arm not in ("baseline", TWO_VIEW) else (None, None))
            rows.append(row)
    rows.sort(key=lambda x: (x["init"], x["steps"]))
    return rows


def _gain(row: dict, g: str) -> str:
    v, se = row[f"{g}_gain" if g in GROUPS else g], row[f"{g}_se"]
    if v is None:
        return "-"
    if se is None or math.isnan(se):
        return f"{v:+.2f}"
    return f"{v:+.2f} ± {se:.2f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'init':<8}{'steps':>6}  {'arm':<12}{'n':>3}{'unseen mIoU':>16}{'unseen gain':>16}"
            f"{'corruption gain':>18}{'source gain':>16}{'unseen over two-view':>22}")
    print(head)
    print("-" * len(head))
    for r in rows:
        mean = f"{r['unseen_mean']:.2f}" + ("" if math.isnan(r["unseen_std"]) else f" ± {r['unseen_std']:.2f}")
        print(f"{r['init']:<8}{r['steps']:>6}  {r['arm']:<12}{r['seeds']:>3}{mean:>16}{_gain(r, 'unseen'):>16}"
              f"{_gain(r, 'corruption'):>18}{_gain(r, 'source'):>16}{_gain(r, 'unseen_over_two_view'):>22}")
    print("mIoU (%); gain: mean of the per-seed differences to the same setting's baseline (last column: to its "
          "two-view CE arm) ± its standard error")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lines: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["arm"] != "baseline" and r["unseen_gain"] is not None:
            lines.setdefault((r["init"], r["arm"]), []).append(r)
    for i, ((init, arm), pts) in enumerate(sorted(lines.items())):
        pts.sort(key=lambda x: x["steps"])
        shift = 1 + 0.025 * (i - (len(lines) - 1) / 2)  # side by side at a shared step count
        xs = [p["steps"] * shift for p in pts]
        ys = [p["unseen_gain"] for p in pts]
        es = [0.0 if p["unseen_se"] is None or math.isnan(p["unseen_se"]) else p["unseen_se"] for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o" if init == "random" else "s", capsize=3,
                    linestyle="-" if init == "random" else "--", label=f"{arm} ({init} init)")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    steps = sorted({r["steps"] for r in rows})
    ax.set_xticks(steps, [str(v) for v in steps])
    ax.minorticks_off()
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("unseen mIoU gain over the baseline (pts, ±1 s.e.)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="dg_effect.py result JSON files, one per setting")
    ap.add_argument("--out", default=str(ROOT / "bench/results/dg_effect_curve.json"))
    ap.add_argument("--png", default=None, help="default: next to --out, .png")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"dg_effect_curve: no such result file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = settings_rows(paths)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "command": "python bench/dg_effect_curve.py " + " ".join(
        argv if argv is not None else sys.argv[1:])}, indent=1))
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot(rows, png)
    print(f"[dg_effect_curve] {out}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
