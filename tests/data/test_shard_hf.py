"""`blindseg shard hf DIR`: a local Hugging Face dataset (save_to_disk or parquet) -> our shards;
`--upload-to` prints the upload command."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from PIL import Image

from blindseg_dist.cli import main
from blindseg_dist.data.evalset import EvalDataset
from blindseg_dist.data.labels import CITYSCAPES_ID_TO_TRAIN
from blindseg_dist.data.location import upload_command
from blindseg_dist.data.shards import verify_shards
from tests.data._tiny_shards import make_frame


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _frames(n=5, cityscapes_ids=False):
    out = []
    for i in range(n):
        image, label = make_frame(20 + 2 * i, 30, seed=i)
        if cityscapes_ids:  # trainIds 0/2/8/10/13 -> labelIds 7/11/21/23/26, ignore -> 0 (unlabeled)
            inv = {0: 7, 2: 11, 8: 21, 10: 23, 13: 26, 255: 0}
            label = np.vectorize(inv.get)(label).astype(np.uint8)
        out.append((f"frame_{i}", image, label))
    return out


def _hf_dataset(frames):
    import datasets

    feats = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image(),
                               "mask": datasets.Image()})
    return datasets.Dataset.from_dict({"name": [k for k, _, _ in frames],
                                       "image": [Image.fromarray(im) for _, im, _ in frames],
                                       "mask": [Image.fromarray(lab, mode="L") for _, _, lab in frames]},
                                      features=feats)


def _check(out, frames, lut=None):
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "hf" and m["num_samples"] == len(frames) and verify_shards(out)["ok"]
    ds = EvalDataset(out)
    got = {ds.load_raw(i)[2]: ds.load_raw(i)[:2] for i in range(len(ds))}
    for key, image, label in frames:
        gi, gl = got[key]
        np.testing.assert_array_equal(gi, image)
        np.testing.assert_array_equal(gl, label if lut is None else lut[label])
    return m


def test_shard_hf_save_to_disk_and_dataset_dict(tmp_path, capsys):
    import datasets

    frames = _frames()
    ds = _hf_dataset(frames)
    ds.save_to_disk(str(tmp_path / "saved"))
    capsys.readouterr()
    rc = main(["shard", "hf", str(tmp_path / "saved"), "--out", str(tmp_path / "s1"), "--label-column", "mask",
               "--key-column", "name", "--samples-per-shard", "2", "--upload-to", "s3://bucket/mine"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert upload_command(tmp_path / "s1", "s3://bucket/mine") in printed and "data.train=s3://bucket/mine" in printed
    m = _check(tmp_path / "s1", frames)
    assert len(m["shards"]) == 3 and m["label_map"] == "trainids"

    ids = _frames(3, cityscapes_ids=True)
    datasets.DatasetDict({"train": _hf_dataset(frames), "validation": _hf_dataset(ids)}).save_to_disk(
        str(tmp_path / "dd"))
    rc = main(["shard", "hf", str(tmp_path / "dd"), "--out", str(tmp_path / "s2"), "--split", "validation",
               "--label-column", "mask", "--key-column", "name", "--label-map", "cityscapes_ids"])
    assert rc == 0
    m = _check(tmp_path / "s2", ids, lut=CITYSCAPES_ID_TO_TRAIN)
    assert m["split"] == "validation" and m["label_map"] == "cityscapes_ids"
    capsys.readouterr()
    assert main(["shard", "hf", str(tmp_path / "dd"), "--out", str(tmp_path / "s3"), "--split", "test",
                 "--label-column", "mask"]) == 2
    assert "'test' is not in" in capsys.readouterr().err
    assert main(["shard", "hf", str(tmp_path / "saved"), "--out", str(tmp_path / "s3")]) == 2  # no 'label' column
    assert "--label-column" in capsys.readouterr().err


def test_shard_hf_parquet_rows_keys_and_rejects(tmp_path):
    frames = _frames(4)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    _hf_dataset(frames[:3]).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    _hf_dataset(frames[3:]).to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    assert main(["shard", "hf", str(tmp_path / "pq"), "--out", str(tmp_path / "s"), "--split", "train",
                 "--label-column", "mask"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert sorted(s["key"] for s in m["samples"]) == ["00000000", "00000001", "00000002"]  # row numbers (shuffled order)
    ds = EvalDataset(tmp_path / "s")
    for i in range(3):
        image, label, key = ds.load_raw(i)
        np.testing.assert_array_equal(image, frames[int(key)][1])
        np.testing.assert_array_equal(label, frames[int(key)][2])
    # a colour-coded label column is refused per sample (skipped and listed), never decoded by colour
    import datasets

    rgb = datasets.Dataset.from_dict({"image": [Image.fromarray(frames[0][1])],
                                      "label": [Image.fromarray(frames[0][1])]},
                                     features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}))
    rgb.save_to_disk(str(tmp_path / "rgb"))
    from blindseg_dist.data.shards import write_shards
    from blindseg_dist.data.sources import get_source

    m = write_shards(get_source("hf", str(tmp_path / "rgb")), tmp_path / "s_rgb", progress=False)
    assert m["num_samples"] == 0 and m["shards"] == [] and "colour-coded" in m["skipped"][0]["reason"]


def test_upload_command(tmp_path, capsys, train_shards):
    s3 = upload_command("/d/shards", "s3://bucket/gta5-train/")
    assert s3.startswith("aws s3 cp --recursive --exclude manifest.json") and \
        s3.endswith("aws s3 cp /d/shards/manifest.json s3://bucket/gta5-train/manifest.json")
    assert "gcloud storage rsync" in upload_command("/d/shards", "gs://b/x")
    rs = shlex.split(upload_command("/d/my shards", "me@host:/srv/shards").split(" && ")[1])
    assert rs == ["rsync", "-a", "/d/my shards/manifest.json", "me@host:/srv/shards/manifest.json"]
    with pytest.raises(ValueError, match="http"):
        upload_command("/d", "https://host/x")
    # any other fsspec store: a python one-liner through fsspec, run here against memory://
    import subprocess
    import sys

    import fsspec

    cmd = upload_command(str(train_shards), "memory://up")
    code = shlex.split(cmd)[2] + "; import json; fs=fsspec.filesystem('memory'); print(json.dumps(sorted(fs.ls('/up', detail=False))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = [p.rsplit("/", 1)[-1] for p in json.loads(out)]
    assert "manifest.json" in names and sum(n.endswith(".tar") for n in names) == 4
    assert fsspec  # imported for the one-liner's environment
