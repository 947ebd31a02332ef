"""Our shards read with Hugging Face ``datasets`` (webdataset builder), fully offline."""
import io

import numpy as np
from PIL import Image

from blindseg_dist.data.shards import write_shards
from tests.data._dataset_formats import write_cityscapes


def test_hf_datasets_streams_our_shards(tmp_path, monkeypatch):
    cityscapes_root = write_cityscapes(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    from blindseg_dist.data.sources import get_source

    src = get_source("cityscapes", str(cityscapes_root), split="val")
    m = write_shards(src, tmp_path / "shards", samples_per_shard=2, progress=False)
    tars = [str(tmp_path / "shards" / s["name"]) for s in m["shards"]]
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               streaming=True, cache_dir=str(tmp_path / "cache"))
    rows = list(ds)
    assert [r["__key__"] for r in rows] == [s["key"] for s in m["samples"]]
    by_key = {it.key: it for it in src}
    for row in rows:
        image, label = src.load_pair(by_key[row["__key__"]])
        lab = row["label.png"]
        lab = np.array(lab if isinstance(lab, Image.Image) else Image.open(io.BytesIO(lab)))
        np.testing.assert_array_equal(lab, label)
        np.testing.assert_array_equal(np.array(row["image.png"].convert("RGB")), image)
        assert row["meta.json"]["key"] == row["__key__"]
        assert row["meta.json"]["size"] == list(label.shape)
