"""ACDC as released (rgb_anon/ + gt/ with *_gt_labelTrainIds.png): listing per condition, the same
bad-frame handling as the other readers (a size mismatch or ids outside the table skipped and
reported in the manifest, a frame without a label listed as skipped), `blindseg shard acdc`, the raw
folder as an evaluation target, and the acdc protocol (Rein's 1024 / 683 sliding window)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from blindseg_dist.cli import main
from blindseg_dist.data.evalset import EvalDataset
from blindseg_dist.data.shards import write_shards
from blindseg_dist.data.sources import LayoutError, detect_dataset, get_source
from blindseg_dist.engine.evaluate import ACDC_WINDOW, build_eval_dataset, target_protocol, target_window
from tests.data._dataset_formats import ids, rgb, save_gray_png, save_rgb_png, write_acdc

FRAMES = {"fog": ["GOPR0475_frame_000247", "GOPR0476_frame_000854"], "night": ["GOPR0351_frame_000159"],
          "rain": ["GOPR0402_frame_000001"], "snow": ["GP010122_frame_000021"]}


def test_conditions_keys_and_labels(tmp_path):
    frames = write_acdc(tmp_path, FRAMES)
    assert detect_dataset(str(tmp_path)) == "acdc"
    fog = get_source("acdc", str(tmp_path), split="val", condition="fog")
    assert [it.key for it in fog] == ["fog_GOPR0475_frame_000247", "fog_GOPR0476_frame_000854"]
    assert fog.split == "fog_val" and fog.label_map_name == "acdc_trainids"
    for it in fog:
        img, lab = fog.load_pair(it)
        np.testing.assert_array_equal(img, frames[it.key][0])
        np.testing.assert_array_equal(lab, frames[it.key][1])  # trainIds as stored
    every = get_source("acdc", str(tmp_path))  # default: all conditions, split val
    assert sorted(it.key for it in every) == sorted(frames) and every.split == "all_val"
    with pytest.raises(ValueError, match="no public labels"):
        get_source("acdc", str(tmp_path), split="test")
    with pytest.raises(ValueError, match="condition"):
        get_source("acdc", str(tmp_path), condition="sand")
    with pytest.raises(LayoutError, match="gt/night/train|rgb_anon/night/train"):
        get_source("acdc", str(tmp_path), split="train", condition="night")


def test_bad_frames_are_skipped_and_reported(tmp_path):
    write_acdc(tmp_path, {"rain": ["GOPR0402_frame_000001", "GOPR0402_frame_000002", "GOPR0402_frame_000003"]})
    seq = "GOPR0402"
    # a label of another size, ids outside the table, an image without a label
    save_gray_png(tmp_path / "gt/rain/val" / seq / f"{seq}_frame_000002_gt_labelTrainIds.png", ids(5, [0, 1], h=8, w=8))
    save_gray_png(tmp_path / "gt/rain/val" / seq / f"{seq}_frame_000003_gt_labelTrainIds.png", ids(6, [0, 19, 200]))
    save_rgb_png(tmp_path / "rgb_anon/rain/val" / seq / f"{seq}_frame_000009_rgb_anon.png", rgb(9))
    src = get_source("acdc", str(tmp_path), condition="rain")
    assert src.skipped == [{"key": "rain_GOPR0402_frame_000009", "reason": src.skipped[0]["reason"]}]
    manifest = write_shards(src, tmp_path / "shards", samples_per_shard=2, progress=False)
    assert [s["key"] for s in manifest["samples"]] == ["rain_GOPR0402_frame_000001"]
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert "size mismatch" in reasons["rain_GOPR0402_frame_000002"]
    assert "[19, 200]" in reasons["rain_GOPR0402_frame_000003"]
    assert "no label file" in reasons["rain_GOPR0402_frame_000009"]
    with pytest.raises(ValueError, match="evaluation never skips"):  # raw evaluation of it refuses the frame
        ds = build_eval_dataset(f"acdc:{tmp_path}", "acdc")
        [ds[i] for i in range(len(ds))]


def test_shard_command_and_the_acdc_protocol(tmp_path, capsys):
    frames = write_acdc(tmp_path / "acdc", FRAMES)
    out = tmp_path / "fog"
    assert main(["shard", "acdc", str(tmp_path / "acdc"), "--condition", "fog", "--out", str(out),
                 "--samples-per-shard", "1"]) == 0
    assert "taking its evaluation split 'val'" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "acdc" and m["split"] == "fog_val" and m["num_samples"] == 2
    ds = EvalDataset(out)
    for i in range(len(ds)):
        img, lab, key = ds.load_raw(i)
        np.testing.assert_array_equal(img, frames[key][0])
        np.testing.assert_array_equal(lab, frames[key][1])
    assert main(["shard", "gta5", str(tmp_path / "acdc"), "--condition", "fog", "--out", str(tmp_path / "x")]) == 2
    # the protocol: from the manifest's dataset or a raw folder, Rein's window unless eval.sliding_window is set
    assert target_protocol("fog", out) == "acdc" == target_protocol("t", f"acdc:{tmp_path / 'acdc'}")
    assert target_protocol("t", str(tmp_path / "acdc")) == "acdc"  # detected from its layout
    assert target_window("acdc", []) == [1024, 683] == list(ACDC_WINDOW)
    assert target_window("acdc", [512, 256]) == [512, 256] and target_window("full", []) == []


def test_evaluation_gives_acdc_targets_their_window(tmp_path, monkeypatch):
    import torch

    from blindseg_dist.config import EvalConfig
    from blindseg_dist.engine import evaluate

    write_acdc(tmp_path / "acdc", {"snow": FRAMES["snow"]})
    write_shards(get_source("acdc", str(tmp_path / "acdc"), condition="snow"), tmp_path / "snow", progress=False)
    windows = []
    real = evaluate.make_predictor
    monkeypatch.setattr(evaluate, "make_predictor", lambda sw: (windows.append(list(sw or [])), real(sw))[1])
    net = torch.nn.Conv2d(3, 19, 1)
    res = evaluate.evaluate_targets(net, EvalConfig(targets={"snow": str(tmp_path / "snow"), "plain": str(tmp_path / "snow")},
                                                    protocols={"plain": "full"}), "cpu")
    assert windows == [[1024, 683], []]
    assert res["snow"]["protocol"] == "acdc" and res["plain"]["protocol"] == "full"
    assert res["snow"]["confusion_matrix"] == res["plain"]["confusion_matrix"]  # a window covering the frame
