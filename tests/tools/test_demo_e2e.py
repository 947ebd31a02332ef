"""End to end: `blindseg demo` on 2 real CPU processes (synth -> shards -> train -> eval -> report)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blindseg_dist.config import load_config

TERMS = ("ce", "ce_aug", "aux", "cml", "ccl", "cwcl", "sdcl", "total")


def _scalar_tags(folder: Path) -> set[str]:
    tags: set[str] = set()
    for ev in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_demo_two_processes(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "blindseg_dist", "demo", "--steps", "4", "--output-dir", str(out),
         "--images-per-domain", "10"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert set(report["targets"]) == set(report["eval_data"]) and len(report["targets"]) >= 4  # source + 3 unseen
    for name, res in report["targets"].items():
        cm = res["confusion_matrix"]
        assert len(cm) == 19 and all(len(r) == 19 for r in cm)
        assert 0.0 <= res["miou"] <= 1.0 and set(res["per_class_iou"]) >= {"road", "sky"}
        assert sum(map(sum, cm)) > 0
    assert Path(report["checkpoint"]).is_dir() and (Path(report["checkpoint"]) / "model.safetensors").is_file()
    # the resolved config is usable as --config again
    cfg = load_config(report["config"])
    assert cfg.optim.max_steps == 4 and cfg.data.train.endswith("source-train")
    assert yaml.safe_load(Path(report["config"]).read_text())["loss"]["cwcl"] == 0.3
    tags = _scalar_tags(Path(report["tensorboard"]))
    for term in TERMS:
        assert f"loss/{term}" in tags, sorted(tags)
    for name in report["targets"]:
        assert f"miou/{name}" in tags, sorted(tags)
    assert "lr" in tags and "images_per_s" in tags
    assert "Results (world size 2" in proc.stdout and "mean unseen" in proc.stdout
    # what a person looks at: prediction panels (PNG and TensorBoard) and each target's confusion figure
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Image.open(report["panels"]) as im:
        assert im.format == "PNG" and im.size[0] >= 4 * 128 and im.size[1] > 2 * 128
    for name, png in report["confusion_figures"].items():
        assert name in report["targets"] and Image.open(png).format == "PNG"
    images: set = set()
    for ev in Path(report["tensorboard"]).glob("events.*"):
        acc = EventAccumulator(str(ev), size_guidance={"images": 0})
        acc.Reload()
        images |= set(acc.Tags()["images"])
    assert "demo/panels" in images and {f"confusion/{n}" for n in report["targets"]} <= images, sorted(images)
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "run" / "summary.csv").is_file()
