"""`blindseg demo`: synth -> shard -> train on the source domain with N CPU processes -> eval on the
held-out source frames and every unseen domain -> a printed table and DIR/report.json.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from .. import atomic
from ..config import find_config, load_config, load_yaml
from ..errors import ConfigError
from ..launcher import blindseg_command, launch_env
from .evaluate_cli import confusion_png


def demo_config_path() -> Path:
    """configs/demo.yaml, shipped with the package."""
    return find_config("demo")


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    print(f"[demo] {what}: {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {what} failed with exit code {proc.returncode}")


def write_demo_panels(ckpt: Path, train_shards: str, targets: dict[str, str], png: Path, tb_dir: Path, cfg) -> Path:
    """DIR/panels.png and the TensorBoard image ``demo/panels`` (at the final step): training crops
    (input | augmented view | ground truth | prediction) and the first frame of every target."""
    from PIL import Image

    from ..engine.figures import prediction_panels
    from ..engine.logging import RunLogger
    from .evaluate_cli import load_checkpoint_model

    _, net = load_checkpoint_model(ckpt)
    panel = prediction_panels(net, train_shards, targets, crop_size=cfg.data.crop_size, seed=cfg.run.seed)
    with atomic.replacing(png) as tmp:
        Image.fromarray(panel).save(tmp, format="PNG")
    logger = RunLogger(tb_dir, enabled=True)
    logger.image("demo/panels", panel, cfg.optim.max_steps)
    logger.close()
    return png


def prepare_data(out: Path, *, domains: int, images_per_domain: int, size: tuple[int, int], seed: int,
                 val_fraction: float, samples_per_shard: int) -> tuple[str, dict[str, str], dict[str, float]]:
    """The demo's data under ``out``: synthetic domains (synth/), the source frames split into
    training / held-out (splits/), shards (shards/source-train, shards/source-val, shards/<domain>).
    Returns (training shards, {target name: shard dir} with 'source' first, timings)."""
    from ..data.shards import write_shards
    from ..data.sources import get_source
    from ..data.synth import generate

    timings: dict[str, float] = {}
    t = time.perf_counter()
    synth_dir = out / "synth"
    summary = generate(synth_dir, domains=domains, images_per_domain=images_per_domain, size=size, seed=seed)
    timings["synth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    frames = sorted(p.name for p in (synth_dir / "gta5" / "images").glob("*.png"))
    n_val = max(1, int(round(len(frames) * val_fraction)))
    split_dir = out / "splits"
    split_dir.mkdir(exist_ok=True)
    (split_dir / "source_train.txt").write_text("\n".join(frames[:-n_val]) + "\n")
    (split_dir / "source_val.txt").write_text("\n".join(frames[-n_val:]) + "\n")
    shards = out / "shards"
    spp = samples_per_shard
    # class-uniform centroids per whole tile: the released 1024 tile on a ~1050-px-high GTA5 frame is one
    # tile of the frame's height; the small demo frames get the same proportion (tile = frame height)
    write_shards(get_source("gta5", synth_dir / "gta5", split=str(split_dir / "source_train.txt")),
                 shards / "source-train", samples_per_shard=spp, centroid_tile=min(size))
    eval_data = {"source": str(shards / "source-val")}
    write_shards(get_source("gta5", synth_dir / "gta5", split=str(split_dir / "source_val.txt")),
                 shards / "source-val", samples_per_shard=spp)
    for dom in summary["domains"][1:]:
        name = dom["name"]
        write_shards(get_source("cityscapes", synth_dir / dom["path"], split=dom["split"]), shards / name,
                     samples_per_shard=spp)
        eval_data[name] = str(shards / name)
    timings["shard_s"] = time.perf_counter() - t
    return str(shards / "source-train"), eval_data, timings


def run_demo(output_dir: str | Path = "demo_output", steps: int | None = None, processes: int = 2,
             images_per_domain: int | None = None) -> dict:
    t0 = time.perf_counter()
    out = Path(output_dir).resolve()
    from ..engine.checkpoint import list_checkpoints

    if list_checkpoints(out / "run"):  # a training run never mixes into another (engine/rundir.py)
        raise ConfigError(f"{out / 'run'} holds the checkpoints of an earlier demo; pass a new --output-dir "
                          "or remove that folder")
    out.mkdir(parents=True, exist_ok=True)
    demo_yaml = load_yaml(demo_config_path().read_text())
    demo = load_config(demo_config_path()).demo

    # 1. data
    train_shards, eval_data, timings = prepare_data(
        out, domains=demo.domains, images_per_domain=images_per_domain or demo.images_per_domain,
        size=tuple(demo.size), seed=demo.seed, val_fraction=demo.source_val_fraction,
        samples_per_shard=demo.samples_per_shard)

    # 2. training (N processes), the resolved config is saved next to the run
    run_dir = out / "run"
    cfg_file = out / "demo_train.yaml"
    demo_yaml.setdefault("data", {})["train"] = train_shards
    demo_yaml.setdefault("run", {})["output_dir"] = str(run_dir)
    if steps is not None:
        demo_yaml.setdefault("optim", {})["max_steps"] = int(steps)
    demo_yaml.setdefault("eval", {})["at_end"] = False  # evaluated below by `blindseg eval`
    cfg_file.write_text(yaml.safe_dump(demo_yaml, sort_keys=False))
    cfg = load_config(cfg_file)  # validate before starting processes
    t = time.perf_counter()
    cmd = blindseg_command(["train", "--config", str(cfg_file)], processes=processes)
    _run(cmd, launch_env(), f"training on {processes} process(es)")
    timings["train_s"] = time.perf_counter() - t
    ckpt = run_dir / "checkpoints" / str(cfg.optim.max_steps)

    # 3. evaluation on the held-out source frames and every unseen domain
    t = time.perf_counter()
    eval_json = out / "eval.json"
    cmd = blindseg_command(["eval", "--checkpoint", str(ckpt), "--json", str(eval_json), "--tb-dir",
                            str(run_dir / "tb"), "--data", *[f"{k}={v}" for k, v in eval_data.items()]],
                           processes=processes)
    _run(cmd, launch_env(), f"evaluation on {processes} process(es)")
    timings["eval_s"] = time.perf_counter() - t

    # 4. what a person looks at: prediction panels (DIR/panels.png and TensorBoard)
    panels_png = write_demo_panels(ckpt, train_shards, eval_data, out / "panels.png",
                                   run_dir / "tb", cfg)

    from .report import print_report

    result = json.loads(eval_json.read_text())
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "world_size": result["world_size"],
        "targets": result["targets"],
        "checkpoint": str(ckpt),
        "eval_data": eval_data,
        "config": str(run_dir / "config.yaml"),
        "tensorboard": str(run_dir / "tb"),
        "timings": timings,
        "panels": str(panels_png),
        "confusion_figures": {k: str(confusion_png(eval_json, k)) for k in eval_data},
        "source": "source",
        "unseen": [k for k in eval_data if k != "source"],
    }
    atomic.write_json(out / "report.json", report, indent=1)
    print_report(report)
    print(f"[demo] prediction panels {panels_png}; confusion matrices {out}/eval-confusion-<target>.png")
    print(f"[demo] done in {timings['total_s']:.0f} s; report {out / 'report.json'}; "
          f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return report
