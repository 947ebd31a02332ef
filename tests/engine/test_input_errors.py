"""Bad inputs give a clear message and the documented exit code (2 for bad config or input files),
in real `blindseg` processes: unknown backbones, out-of-range momentum, a batch BatchNorm cannot
train on, crops larger than the frames, unreadable or foreign checkpoints, eval paths, and shard runs
that skip everything."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from blindseg_dist import cli
from blindseg_dist.engine import checkpoint as ckpt
from tests.engine._engine_runs import ROOT, env, run, tail, train_cmd


@pytest.mark.parametrize("override, expected", [
    ("model.backbone=resnet9000", ["'model.backbone'", "'resnet9000'", "resnet18", "timm:<name>"]),
    ("model.backbone=timm:no_such_net", ["'model.backbone'", "timm has no model 'no_such_net'"]),
    ("optim.momentum=5", ["'optim.momentum'", "5", "[0, 1)"]),
])
def test_bad_values_are_config_errors(override, expected, capsys, tmp_path):
    rc = cli.main(["train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(tmp_path), override])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "config.yaml").exists()


def test_batch_of_one_on_one_process_and_a_crop_larger_than_the_frames(train_shards, tmp_path):
    res = run(train_cmd(tmp_path / "a", train_shards, 1, "data.batch_size=1", processes=1), env())
    assert res.returncode == 2, tail(res)
    assert "'data.batch_size': value 1 on 1 process: BatchNorm" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "a").exists()  # nothing started
    # frames are 64x128: a 96 px crop is padded, and the run says so
    res = run(train_cmd(tmp_path / "b", train_shards, 1, "data.crop_size=96", processes=1), env())
    assert res.returncode == 0, tail(res)
    assert "data.crop_size=96 is larger than the smallest training frame (128x64" in res.stderr, tail(res)


def test_unreadable_or_foreign_checkpoints_name_the_file(train_shards, tmp_path):
    out = tmp_path / "run"
    res = run(train_cmd(out, train_shards, 2, "run.checkpoint_every=1", processes=1), env())
    assert res.returncode == 0, tail(res)
    first = out / "checkpoints" / "1"  # resumed from into a new folder (a branch of the run)
    saved = tmp_path / "saved"
    shutil.copytree(first, saved)
    resume = ["--resume", str(first)]
    for name in (ckpt.STATE_FILE, ckpt.MODEL_FILE):
        f = first / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated
        res = run(train_cmd(tmp_path / "branch", train_shards, 2, processes=1) + resume, env())
        assert res.returncode == 2, tail(res)
        assert f"checkpoint file {str(f)!r} cannot be read" in res.stderr and "Traceback" not in res.stderr, tail(res)
        shutil.copy(saved / name, f)
    # a checkpoint of another backbone
    res = run(train_cmd(tmp_path / "branch", train_shards, 2, "model.backbone=resnet34", processes=1) + resume, env())
    assert res.returncode == 2, tail(res)
    assert f"checkpoint {str(first)!r} does not fit this network" in res.stderr and "Traceback" not in res.stderr, \
        tail(res)


def test_eval_path_errors_exit_2_and_say_what_is_wrong(train_shards, tmp_path, capsys):
    from tests.engine._eval_fixtures import make_checkpoint

    ck = make_checkpoint(tmp_path / "ckrun")
    cases = [
        ([f"t={train_shards / 'manifest.json'}"], f"{train_shards / 'manifest.json'} is a file, not a .tar shard"),
        (["no_equals_sign"], "--data takes NAME=PATH pairs"),
        ([f"t={tmp_path / 'missing'}"], "does not exist"),
    ]
    for data, expected in cases:
        rc = cli.main(["eval", "--checkpoint", str(ck), "--json", str(tmp_path / "e.json"), "--data", *data])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, (data, err)


def test_a_shard_run_that_skips_every_pair_fails_and_counts_all_skips(tmp_path, capsys):
    from blindseg_dist.data.synth import generate

    generate(tmp_path / "synth", domains=1, images_per_domain=7, size=(32, 64), seed=0)
    root = tmp_path / "synth" / "gta5"
    for label in (root / "labels").iterdir():  # every label of another size: every pair is skipped
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(label)
    rc = cli.main(["shard", "gta5", str(root), "--split", "all", "--out", str(tmp_path / "shards"),
                   "--samples-per-shard", "4"])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert "every pair was skipped (7" in cap.err
    assert "... and 2 more skipped (all 7 under 'skipped'" in cap.out
