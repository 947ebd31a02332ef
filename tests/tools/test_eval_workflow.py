"""`blindseg eval` as a workflow: a run folder (best, else latest checkpoint) or a checkpoint folder;
raw dataset folders read by the sharder's readers give exactly the confusion matrix of their shards;
aAcc / mAcc / fwIoU; the confusion-matrix PNG and TensorBoard figure."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from blindseg_dist.cli import main
from blindseg_dist.engine.evaluate import pixel_metrics, raw_target
from blindseg_dist.tools.evaluate_cli import confusion_png, resolve_checkpoint
from tests.engine._eval_fixtures import make_checkpoint, make_shards


def test_pixel_metrics_as_mmsegmentation_defines_them():
    cm = np.zeros((19, 19), dtype=np.int64)
    cm[0, 0], cm[0, 1], cm[1, 1], cm[1, 0] = 6, 2, 3, 1  # gt class 0: 8 px (6 right), class 1: 4 px (3 right)
    m = pixel_metrics(cm)
    assert m["aacc"] == pytest.approx(9 / 12)
    assert m["macc"] == pytest.approx((6 / 8 + 3 / 4) / 2)  # classes absent from the ground truth excluded
    assert m["fwiou"] == pytest.approx(8 / 12 * 6 / 9 + 4 / 12 * 3 / 6)
    assert all(np.isnan(v) for v in pixel_metrics(np.zeros((19, 19))).values())


def test_checkpoint_resolution_of_run_folders(tmp_path):
    run = tmp_path / "run"
    first = make_checkpoint(run)
    second = shutil.copytree(first, run / "checkpoints" / "2")
    assert resolve_checkpoint(run) == second  # no best.json: the latest
    (run / "best.json").write_text(json.dumps({"step": 1, "checkpoint": str(first)}))
    assert resolve_checkpoint(run) == first  # the best
    assert resolve_checkpoint(second) == second and resolve_checkpoint(second / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        resolve_checkpoint(tmp_path)


def test_eval_on_raw_folders_equals_eval_on_their_shards(tmp_path, capsys):
    shards = make_shards(tmp_path / "data", images=4)
    synth = tmp_path / "data" / "synth"
    assert raw_target(str(synth / "synth_night")) == ("cityscapes", str(synth / "synth_night"))  # detected
    assert raw_target(f"gta5:{synth / 'gta5'}") == ("gta5", str(synth / "gta5"))
    assert raw_target(str(shards["night"])) is None
    run = tmp_path / "run"
    make_checkpoint(run)
    out = tmp_path / "eval" / "res.json"
    rc = main(["eval", "--checkpoint", str(run), "--json", str(out), "--tb-dir", str(tmp_path / "tb"), "--data",
               f"night={shards['night']}", f"night_raw={synth / 'synth_night'}",
               f"night_named=cityscapes:{synth / 'synth_night'}", f"src={shards['train']}",
               f"src_raw=gta5:{synth / 'gta5'}"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"evaluating {run / 'checkpoints' / '1'}" in printed and "aAcc" in printed and "fwIoU" in printed
    t = json.loads(out.read_text())["targets"]
    assert t["night"]["num_pixels"] > 0
    for raw in ("night_raw", "night_named"):
        assert t[raw]["confusion_matrix"] == t["night"]["confusion_matrix"]  # exactly
    assert t["src_raw"]["confusion_matrix"] == t["src"]["confusion_matrix"]
    for k in ("miou", "aacc", "macc", "fwiou"):
        assert t["night_raw"][k] == t["night"][k] and 0 <= t["night"][k] <= 1
    for name in t:
        with Image.open(confusion_png(out, name)) as im:
            assert im.format == "PNG" and im.size[0] >= 400
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert "confusion/night" in events.Tags()["images"] and "fwiou/night" in events.Tags()["scalars"]


def test_eval_errors_name_the_raw_folder(tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(run)
    rc = main(["eval", "--checkpoint", str(run), "--json", str(tmp_path / "o.json"), "--data",
               f"x=cityscapes:{tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "cityscapes folder" in err and "missing" in err and not (tmp_path / "o.json").exists()


def test_prediction_panels_show_training_crops_and_each_target(tmp_path):
    from blindseg_dist.tools.demo import prediction_panels
    from blindseg_dist.tools.evaluate_cli import load_checkpoint_model

    shards = make_shards(tmp_path / "data", images=2)
    _, net = load_checkpoint_model(make_checkpoint(tmp_path / "run"))
    panel = prediction_panels(net, str(shards["train"]), {"night": str(shards["night"])}, crop_size=32)
    # titled grids as wide as the night row (3 full 64x128 frames, 4 px gaps): the 2 training rows' 4 columns
    # of 32 px crops scaled to fill that width (95 px cells); a 2-line title strip above each grid
    width = 3 * 128 + 2 * 4
    strip = 2 * (15 + 6)
    assert panel.dtype == np.uint8 and panel.shape == (strip + 2 * 95 + 4 + strip + 64, width, 3)
    assert (panel[:, width // 2:] != 255).any(axis=(1, 2)).mean() > 0.7  # no blank right half
