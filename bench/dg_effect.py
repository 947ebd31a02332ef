"""Does BlindNet's objective beat the baseline on domains it never saw? A paired, seeded experiment
on the CPU, through `blindseg ablate`.

Three arms, trained on the synthetic source domain (rendered like `blindseg demo`'s data):
  baseline     original view only, CE (+ aux CE)
  two-view CE  both views, CE = mean of both, no extra loss
  all four     both views, CE + CML + CCL + CWCL + SDCL (the BlindNet objective)
(`--shares` adds "+CML+CCL" (encoder losses) and "+CWCL+SDCL" (decoder losses) to split the gain.)
Every arm runs the same seed list (run.seed = 304, 305, ...), so arm and baseline runs of one seed
share the initial weights and data order and their difference is paired.

Targets, fixed before the first run and never chosen by their outcome:
  - the unseen synthetic domains: every rendering domain of data/synth.py but the source
    (UNSEEN below), each evaluated on the first --eval-images frames;
  - the held-out source frames under the 15 standard corruptions of imagecorruptions at severity 3
    (CORRUPTIONS, SEVERITY), written once by `blindseg corrupt`, evaluated on every run's final
    checkpoint (tools/ablate.evaluate_extra);
  - the held-out source frames themselves (clean).

Writes bench/results/dg_effect.json (one row per arm, seed and target, the setting, sizes, wall
time, per-run loss logs) and prints mean +- std per arm and the paired gain over the baseline with
its standard error (std of the per-seed differences / sqrt(n)). Resumable: rerun the same command;
finished runs are skipped (ablate), finished evaluations too.

    python bench/dg_effect.py                      # the reported setting (docs/BENCHMARKS.md)
    python bench/dg_effect.py --tiny --out /tmp/x  # seconds-scale smoke run (tests/test_benches.py)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# --- fixed before the first run ---------------------------------------------------------------
SOURCE = "source"
UNSEEN = ("synth_night", "synth_fog", "synth_rain", "synth_dusk", "synth_snow")
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITY = 3
BASE_SEED = 304
OFF = {"loss.cml": 0, "loss.ccl": 0, "loss.cwcl": 0, "loss.sdcl": 0}
ARMS = (
    ("baseline", {"loss.two_view": False, **OFF}),
    ("two-view CE", {"loss.two_view": True, **OFF}),
    ("all four", {"loss.two_view": True, "loss.cml": 0.2, "loss.ccl": 0.2, "loss.cwcl": 0.3, "loss.sdcl": 0.3}),
)
SHARE_ARMS = (
    ("+CML+CCL", {"loss.two_view": True, **OFF, "loss.cml": 0.2, "loss.ccl": 0.2}),
    ("+CWCL+SDCL", {"loss.two_view": True, **OFF, "loss.cwcl": 0.3, "loss.sdcl": 0.3}),
)
LOSS_KEYS = ("loss/ce", "loss/ce_aug", "loss/aux", "loss/cml", "loss/ccl", "loss/cwcl", "loss/sdcl", "loss/total")


def corruption_target(name: str) -> str:
    return f"{name}-s{SEVERITY}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="dg_effect_output", help="working folder: data, runs, corrupted sets")
    ap.add_argument("--results", default=str(ROOT / "bench/results/dg_effect.json"), help="JSON written here")
    ap.add_argument("--png", default=None, help="bar chart (default: next to --results, .png)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (run.seed = 304 + i, shared by all arms)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of every run")
    ap.add_argument("--batch", type=int, default=4, help="images per step")
    ap.add_argument("--crop", type=int, default=64, help="square training crop")
    ap.add_argument("--size", default="96x192", help="HxW of the rendered frames")
    ap.add_argument("--images-per-domain", type=int, default=120, help="frames rendered per domain (source: "
                    "85%% train, 15%% held out)")
    ap.add_argument("--eval-images", type=int, default=12, help="frames evaluated per unseen domain and of the "
                    "held-out source (0: all; the source holds out 18 at the default size)")
    ap.add_argument("--corrupt-images", type=int, default=4, help="held-out frames evaluated per corruption")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--init", choices=("random", "source"), default="random",
                    help="random weights, or a backbone first trained on the source by `blindseg train` "
                         "(baseline objective, --pretrain-steps; stands in for ImageNet weights)")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--shares", action="store_true", help="also the encoder-loss and decoder-loss arms")
    ap.add_argument("--parallel", type=int, default=4, help="runs at once (one thread each)")
    ap.add_argument("--no-corruptions", action="store_true",
                    help="skip the corrupted held-out sets (unseen domains and clean source only)")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: evaluate and report the runs that reached their last step (others are listed)")
    ap.add_argument("--tiny", action="store_true", help="smoke setting: 4 frames of 32x64 per domain, crop 32, "
                    "1 step, 2 seeds, 1 corruption (only for checking the script)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.images_per_domain, args.size, args.crop, args.steps, args.batch = 4, "32x64", 32, 1, 2
        args.seeds, args.eval_images, args.corrupt_images, args.pretrain_steps = min(args.seeds, 2), 0, 0, 1
    if args.seeds < 2:
        ap.error("--seeds: need at least 2 for a standard error")
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    return args


def blindseg(*args: str, log: Path | None = None) -> None:
    from blindseg_dist.launcher import launch_env

    cmd = [sys.executable, "-m", "blindseg_dist", *args]
    print("$ blindseg " + " ".join(args), flush=True)
    if log is None:
        rc = subprocess.run(cmd, env=launch_env(), cwd=ROOT).returncode
    else:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=launch_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"blindseg {args[0]} failed with exit code {rc}" + (f"; log {log}" if log else ""))


def prepare(args, out: Path) -> tuple[str, dict[str, str]]:
    """Rendered domains and shards (once; `blindseg demo`'s data preparation)."""
    from blindseg_dist.tools.demo import prepare_data

    marker = out / "data" / "targets.json"
    if marker.is_file():
        d = json.loads(marker.read_text())
        return d["train"], d["targets"]
    from blindseg_dist.data.synth import DOMAINS

    assert tuple(d.name for d in DOMAINS[1:]) == UNSEEN, "the generator's domains changed; UNSEEN is fixed"
    train, targets, _ = prepare_data(out / "data", domains=len(DOMAINS), images_per_domain=args.images_per_domain,
                                     size=args.size, seed=0, val_fraction=0.15, samples_per_shard=16)
    marker.write_text(json.dumps({"train": train, "targets": targets}, indent=1))
    return train, targets


def corrupted_sets(args, out: Path, source_val: str) -> dict[str, str]:
    """{<corruption>-s3: shard dir} of the held-out source frames, written once by `blindseg corrupt`."""
    names = CORRUPTIONS[:1] if args.tiny else CORRUPTIONS
    dest = out / "data" / "corrupt"
    marker = dest / "sets.json"
    if not marker.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        blindseg("corrupt", source_val, "--out", str(dest), "--corruptions", ",".join(names),
                 "--severities", str(SEVERITY), "--workers", "1", log=out / "corrupt.log")
        sets = {}
        for name in names:
            d = dest / f"{name}-{SEVERITY}"
            if not (d / "manifest.json").is_file():
                raise SystemExit(f"blindseg corrupt: no set {d} (manifest.json); log {out / 'corrupt.log'}")
            sets[corruption_target(name)] = str(d)
        marker.write_text(json.dumps(sets, indent=1))
    return json.loads(marker.read_text())


def pretrain(args, out: Path, base_overrides: list[str]) -> str:
    """A ResNet backbone trained on the source by `blindseg train` (baseline objective), saved as a
    torchvision-style state dict for model.pretrained (the decoder and heads start fresh in every run)."""
    import torch

    from blindseg_dist.engine.checkpoint import load_model_weights

    pdir = out / "pretrain"
    weights = pdir / "backbone.pth"
    if weights.is_file():
        return str(weights)
    pdir.mkdir(parents=True, exist_ok=True)
    final = pdir / "run" / "checkpoints" / str(args.pretrain_steps)
    if not final.is_dir():
        blindseg("train", "--config", "demo", "--output-dir", str(pdir / "run"), "--resume", *base_overrides,
                 *[f"{k}={json.dumps(v)}" for k, v in ARMS[0][1].items()], f"optim.max_steps={args.pretrain_steps}",
                 "run.seed=1000", "eval.at_end=false", "eval.targets={}", log=pdir / "train.log")
    state = load_model_weights(final)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise SystemExit(f"{final}: no backbone.* tensors")
    torch.save(backbone, weights)
    return str(weights)


def loss_digest(run_dir: Path) -> dict[str, float]:
    """Mean of every logged loss term over the first and the last 10% of the logged steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict[str, float] = {}
    if not rows:
        return out
    k = max(1, len(rows) // 10)
    for key in LOSS_KEYS:
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[f"{key}/first"] = float(np.mean(vals[:k]))
            out[f"{key}/last"] = float(np.mean(vals[-k:]))
    return out


def paired(values: dict[str, dict[int, float]], arm: str, ref: str = "baseline") -> dict:
    seeds = sorted(set(values[arm]) & set(values[ref]))
    d = np.array([values[arm][s] - values[ref][s] for s in seeds])
    if len(d) < 2:
        return {"n": len(d), "gain": float(d.mean()) if len(d) else math.nan, "se": math.nan, "z": math.nan}
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    return {"n": len(d), "gain": float(d.mean()), "se": se, "z": float(d.mean() / se) if se > 0 else math.nan,
            "diffs": d.tolist()}


def summarise(rows: list[dict], arms: list[str], groups: list[str]) -> dict:
    """Per arm and group (unseen mean, corruption mean, source): mean +- std over seeds and the paired gain."""
    per: dict[str, dict[str, dict[int, float]]] = {g: {a: {} for a in arms} for g in groups}
    by_run: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        by_run.setdefault((r["arm"], r["seed"], r["group"]), []).append(r["miou"])
    for (arm, seed, group), vals in by_run.items():
        if group in per:
            per[group][arm][seed] = 100 * float(np.mean(vals))
    out = {}
    for g in groups:
        out[g] = {}
        for a in arms:
            v = list(per[g][a].values())
            out[g][a] = {"n": len(v), "mean": float(np.mean(v)) if v else math.nan,
                         "std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
                         "per_seed": per[g][a]}
            if a != "baseline":
                out[g][a]["paired_gain"] = paired(per[g], a)
    return out


def _cell(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def print_table(summary: dict, arms: list[str], groups: list[str], setting: dict) -> None:
    names = {"unseen": "unseen mean", "corruption": "corruption mean", "source": "source (clean)"}
    head = f"{'arm':<12}{'n':>3}" + "".join(f"{names[g]:>17}{'gain vs baseline':>26}" for g in groups)
    print(head)
    print("-" * len(head))
    for a in arms:
        line = f"{a:<12}{summary[groups[0]][a]['n']:>3}"
        for g in groups:
            s = summary[g][a]
            line += f"{_cell(s['mean'], s['std']):>17}"
            pg = s.get("paired_gain")
            if pg is None or not pg["n"]:
                line += " " * 26
            elif pg["n"] < 2:
                line += f"{pg['gain']:+.2f} (1 seed)".rjust(26)
            else:
                line += f"{pg['gain']:+.2f} ± {pg['se']:.2f} ({pg['z']:+.1f} se)".rjust(26)
        print(line)
    print(f"mIoU (%), mean ± std over the n seeds of each arm (seed list {setting['seed_list']}); gain = mean of the "
          "per-seed differences to the baseline ± its standard error (std / sqrt(n)), and that mean in standard errors")
    span = "" if setting["span_s"] is None else f" (first run to last evaluation: {setting['span_s'] / 60:.1f} min)"
    print(f"setting: {setting['steps']} steps, batch {setting['batch']}, crop {setting['crop']}, frames "
          f"{setting['size'][0]}x{setting['size'][1]}, {setting['train_images']} source training frames, init "
          f"{setting['init']}; {setting['runs']} runs, this invocation {setting['wall_s'] / 60:.1f} min{span} "
          f"on {setting['cpus']} CPUs")


def plot(summary_t: dict, rows: list[dict], arms: list[str], targets: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*targets, "unseen mean", "corruption mean"] if summary_t.get("corruption") else [*targets, "unseen mean"]
    x = np.arange(len(cols))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(cols) + 2), 4.2))
    for i, a in enumerate(arms):
        means, stds = [], []
        for c in cols:
            if c == "unseen mean":
                s = summary_t["unseen"][a]
                m, sd = s["mean"], s["std"]
            elif c == "corruption mean":
                s = summary_t["corruption"][a]
                m, sd = s["mean"], s["std"]
            else:
                v = [100 * r["miou"] for r in rows if r["arm"] == a and r["target"] == c]
                m, sd = float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            means.append(m)
            stds.append(0.0 if math.isnan(sd) else sd)
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=a)
    ax.set_xticks(x, cols, rotation=30, ha="right")
    ax.set_ylabel("mIoU (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top * 1.18)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=len(arms), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from blindseg_dist import atomic
    from blindseg_dist.tools.ablate import GridEntry, evaluate_extra, execute_plan, plan_runs, slugify

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, targets = prepare(args, out)
    unseen = {k: targets[k] for k in UNSEEN}
    eval_targets = {SOURCE: targets[SOURCE], **unseen}
    base = [f"data.train={train}", f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
            f"data.num_workers={0 if args.tiny else 1}", f"optim.max_steps={args.steps}", f"optim.lr={args.lr}", "run.threads=1",
            "run.log_every=5" if args.steps >= 50 else "run.log_every=1",
            f"run.checkpoint_every={max(1, args.steps // 4)}",  # a stopped run resumes from its last quarter
            "run.keep_last=1", "run.log_with=[]", f"eval.max_images={args.eval_images}"]
    corrupt = {} if args.no_corruptions else corrupted_sets(args, out, targets[SOURCE])
    init = "random"
    if args.init == "source":
        weights = pretrain(args, out, base[:-1])
        base.append(f"model.pretrained={weights}")
        init = f"source backbone ({args.pretrain_steps} baseline steps)"
    base.append("eval.targets=" + json.dumps(eval_targets))
    arms = list(ARMS) + (list(SHARE_ARMS) if args.shares else [])
    entries = [GridEntry(name, slugify(name), values) for name, values in arms]
    plan = plan_runs("demo", entries, args.seeds, out, [*base, f"run.seed={BASE_SEED}"])
    # seed-major order: the arms of one seed finish together, so a stopped run leaves complete pairs
    plan = sorted(plan, key=lambda r: (r.seed_index, entries.index(r.entry)))
    if args.collect:  # runs with eval.json, or with their final checkpoint (ablate evaluates it, no training)
        from blindseg_dist.tools.ablate import _final_checkpoint

        done = [r for r in plan if (r.run_dir / "eval.json").is_file() or _final_checkpoint(r, "demo")[0] is not None]
        missing = [str(r.run_dir) for r in plan if r not in done]
        plan = done
        if missing:
            print(f"[dg_effect] --collect: {len(missing)} run(s) not finished, left out: {missing}", flush=True)
    results, status = execute_plan(plan, "demo", parallel=args.parallel, desc="dg_effect")
    extra = (evaluate_extra(plan, "corrupt", corrupt, "demo", parallel=args.parallel,
                            max_images=args.corrupt_images) if corrupt else {})
    if status["failed"]:
        print(f"[dg_effect] {len(status['failed'])} run(s) failed: {status['failed']}", file=sys.stderr)

    rows, runs = [], []
    for r in plan:
        if r.run_dir not in results:
            continue
        got = {**results[r.run_dir], **extra.get(r.run_dir, {})}
        for t, res in got.items():
            group = SOURCE if t == SOURCE else "unseen" if t in UNSEEN else "corruption"
            rows.append({"arm": r.entry.name, "seed": r.seed, "seed_index": r.seed_index, "target": t,
                         "group": group, "miou": res["miou"]})
        runs.append({"arm": r.entry.name, "seed": r.seed, "run_dir": str(r.run_dir), "losses": loss_digest(r.run_dir)})
    arm_names = [a for a, _ in arms]
    groups = ["unseen", *(["corruption"] if corrupt else []), SOURCE]
    summary = summarise(rows, arm_names, groups)
    n_train = json.loads((Path(train) / "manifest.json").read_text()).get("num_samples")
    # the experiment's span over all its invocations (a resumed or collected grid): first run
    # folder's config.yaml to the last evaluation written
    starts = [(r.run_dir / "config.yaml").stat().st_mtime for r in plan if (r.run_dir / "config.yaml").is_file()]
    ends = [p.stat().st_mtime for r in plan for p in r.run_dir.glob("eval*.json")]
    span = (max(ends) - min(starts)) if starts and ends else None
    setting = {"steps": args.steps, "batch": args.batch, "crop": args.crop, "size": list(args.size),
               "images_per_domain": args.images_per_domain, "train_images": n_train,
               "eval_images_per_unseen_domain": args.eval_images or args.images_per_domain,
               "eval_images_per_corruption": args.corrupt_images,
               "init": init, "lr": args.lr, "seeds": args.seeds,
               "seed_list": [BASE_SEED + i for i in range(args.seeds)], "arms": {a: v for a, v in arms},
               "unseen": list(UNSEEN), "corruptions": list(corrupt), "severity": SEVERITY,
               "runs": len(plan), "collect_only": args.collect, "parallel": args.parallel, "threads_per_run": 1, "cpus": os.cpu_count(),
               "wall_s": time.perf_counter() - t0, "span_s": span, "machine": platform.platform(), "tiny": args.tiny,
               "overrides": base, "command": "python bench/dg_effect.py " + " ".join(argv or sys.argv[1:])}
    record = {"setting": setting, "summary": summary, "rows": rows, "runs": runs, "status": status}
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(results_path, record, indent=1)
    png = Path(args.png) if args.png else results_path.with_suffix(".png")
    seeds_per_arm = ", ".join(f"{a} {summary['unseen'][a]['n']}" for a in arm_names)
    plot(summary, rows, arm_names, [SOURCE, *UNSEEN], png,
         f"{args.steps} steps, crop {args.crop}, frames {args.size[0]}x{args.size[1]}, init {init}; "
         f"seeds per arm: {seeds_per_arm}")
    print_table(summary, arm_names, groups, setting)
    print(f"[dg_effect] {results_path}, {png}")
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
