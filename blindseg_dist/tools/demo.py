"""`blindseg demo`: synth -> shard -> train on the source domain with N CPU processes -> eval on the
held-out source frames and every unseen domain -> a printed table, prediction panels and DIR/report.json.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .. import atomic
from ..config import Config, find_config, load_config, load_yaml
from ..data.labels import colorize
from ..data.shards import write_shards
from ..data.sources import get_source
from ..data.stream import make_train_loader
from ..data.synth import generate
from ..engine.checkpoint import list_checkpoints
from ..engine.evaluate import build_eval_dataset, predict_logits, target_protocol
from ..engine.figures import titled_grid
from ..engine.logging import RunLogger, denormalize
from ..errors import ConfigError
from ..launcher import blindseg_command, launch_env
from .evaluate_cli import confusion_png, load_checkpoint_model
from .report import print_report


def demo_config_path() -> Path:
    """configs/demo.yaml, shipped with the package."""
    return find_config("demo")


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    print(f"[demo] {what}: {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {what} failed with exit code {proc.returncode}")


TRAIN_COLUMNS = ("input", "augmented view", "ground truth", "prediction")
TARGET_COLUMNS = ("input", "ground truth", "prediction")


def prediction_panels(net, train_shards: str, targets: dict[str, str], *, crop_size: int, seed: int = 0,
                      n_train: int = 2) -> np.ndarray:
    """The panel a person looks at after a run (figures.titled_grid): ``n_train`` training crops as the
    trainer sees them (input | augmented view | ground truth | prediction; the augmented column only when
    the loader makes a second view), then the first frame of each target (input | ground truth |
    prediction, full resolution, the row named after the target), predicted by ``net`` in eval mode."""
    was_training = net.training
    net.eval()
    loader = make_train_loader(train_shards, batch_size=n_train, crop_size=crop_size, num_workers=0, seed=seed)
    batch = next(iter(loader))
    with torch.no_grad():
        n = min(n_train, batch["image"].shape[0])
        pred = predict_logits(net, batch["image"][:n], batch["label"].shape[-2:]).argmax(1).cpu().numpy()
        aug = batch.get("image_aug")
        train_rows = [(f"training crop {i + 1}",
                       [denormalize(batch["image"][i]), *([denormalize(aug[i])] if aug is not None else []),
                        colorize(batch["label"][i].numpy()), colorize(pred[i])]) for i in range(n)]
        target_rows = []
        for name, path in targets.items():
            item = build_eval_dataset(path, target_protocol(name, path))[0]
            logits = predict_logits(net, item["image"][None], item["label"].shape)
            target_rows.append((name, [denormalize(item["image"]), colorize(item["label"].numpy()),
                                       colorize(logits.argmax(1)[0].cpu().numpy())]))
    net.train(was_training)
    cols = TRAIN_COLUMNS if aug is not None else tuple(c for c in TRAIN_COLUMNS if c != "augmented view")
    sections = [(f"training crops as the trainer sees them ({crop_size} px)", cols, train_rows)]
    if target_rows:
        sections.append(("first frame of each evaluation target (full resolution)", TARGET_COLUMNS, target_rows))
    return titled_grid(sections)


def write_demo_panels(ckpt: Path, train_shards: str, targets: dict[str, str], png: Path, tb_dir: Path, cfg) -> Path:
    """DIR/panels.png and the TensorBoard image ``demo/panels`` (at the final step): training crops
    (input | augmented view | ground truth | prediction) and the first frame of every target."""
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


def _train(out: Path, train_shards: str, steps: int | None, processes: int) -> tuple[Config, Path]:
    """Train on ``processes`` processes with configs/demo.yaml (the resolved config is saved next to
    the run); returns the config and the final checkpoint."""
    demo_yaml = load_yaml(demo_config_path().read_text())
    run_dir = out / "run"
    cfg_file = out / "demo_train.yaml"
    demo_yaml.setdefault("data", {})["train"] = str(train_shards)
    demo_yaml.setdefault("run", {})["output_dir"] = str(run_dir)
    if steps is not None:
        demo_yaml.setdefault("optim", {})["max_steps"] = int(steps)
    demo_yaml.setdefault("eval", {})["at_end"] = False  # evaluated below by `blindseg eval`
    cfg_file.write_text(yaml.safe_dump(demo_yaml, sort_keys=False))
    cfg = load_config(cfg_file)  # validate before starting processes
    cmd = blindseg_command(["train", "--config", str(cfg_file)], processes=processes)
    _run(cmd, launch_env(), f"training on {processes} process(es)")
    return cfg, run_dir / "checkpoints" / str(cfg.optim.max_steps)


def _evaluate(ckpt: Path, eval_json: Path, tb_dir: Path, eval_data: dict[str, str], processes: int) -> None:
    """`blindseg eval` of ``ckpt`` on the held-out source frames and every unseen domain."""
    cmd = blindseg_command(["eval", "--checkpoint", str(ckpt), "--json", str(eval_json), "--tb-dir",
                            str(tb_dir), "--data", *[f"{k}={v}" for k, v in eval_data.items()]],
                           processes=processes)
    _run(cmd, launch_env(), f"evaluation on {processes} process(es)")


def _timed(timings: dict[str, float], key: str, fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, its seconds recorded as ``timings[key]``."""
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[key] = time.perf_counter() - t
    return result


def run_demo(output_dir: str | Path = "demo_output", steps: int | None = None, processes: int = 2,
             images_per_domain: int | None = None) -> dict:
    """The demo end to end in ``output_dir``; returns (and writes as DIR/report.json) the report."""
    t0 = time.perf_counter()
    out = Path(output_dir).resolve()
    if list_checkpoints(out / "run"):  # a training run never mixes into another (engine/rundir.py)
        raise ConfigError(f"{out / 'run'} holds the checkpoints of an earlier demo; pass a new --output-dir "
                          "or remove that folder")
    out.mkdir(parents=True, exist_ok=True)
    demo = load_config(demo_config_path()).demo
    # 1. data (the synthetic domains, then their shards)
    train_shards, eval_data, timings = prepare_data(
        out, domains=demo.domains, images_per_domain=images_per_domain or demo.images_per_domain,
        size=tuple(demo.size), seed=demo.seed, val_fraction=demo.source_val_fraction,
        samples_per_shard=demo.samples_per_shard)
    # 2. training (N processes), 3. evaluation on the held-out source frames and every unseen domain
    cfg, ckpt = _timed(timings, "train_s", _train, out, train_shards, steps, processes)
    eval_json, run_dir = out / "eval.json", out / "run"
    _timed(timings, "eval_s", _evaluate, ckpt, eval_json, run_dir / "tb", eval_data, processes)
    # 4. what a person looks at: prediction panels (DIR/panels.png and TensorBoard)
    panels_png = write_demo_panels(ckpt, train_shards, eval_data, out / "panels.png", run_dir / "tb", cfg)
    result = json.loads(eval_json.read_text())
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "world_size": result["world_size"], "targets": result["targets"], "checkpoint": str(ckpt),
        "eval_data": eval_data, "config": str(run_dir / "config.yaml"), "tensorboard": str(run_dir / "tb"),
        "timings": timings, "panels": str(panels_png),
        "confusion_figures": {k: str(confusion_png(eval_json, k)) for k in eval_data},
        "source": "source", "unseen": [k for k in eval_data if k != "source"],
    }
    atomic.write_json(out / "report.json", report, indent=1)
    print_report(report)
    print(f"[demo] prediction panels {panels_png}; confusion matrices {out}/eval-confusion-<target>.png")
    print(f"[demo] done in {timings['total_s']:.0f} s; report {out / 'report.json'}; "
          f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return report
