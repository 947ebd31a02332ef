import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from blindseg_dist.data import views as V
from blindseg_dist.data.evalset import EvalDataset, mapillary_protocol, resolve_protocol, shard_indices
from tests.data._tiny_shards import make_frame, write_tiny_shards

MEAN = torch.tensor(V.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(V.IMAGENET_STD).view(3, 1, 1)


def to_u8(x):  # normalized (3, H, W) -> uint8 (H, W, 3)
    return torch.round((x * STD + MEAN) * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("n", [0, 1, 7, 10, 13, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_indices_cover_exactly_once(n, world):
    parts = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert [i for p in parts for i in p] == list(range(n))  # contiguous, in rank order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_indices_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    sizes = [(30, 40), (24, 52), (36, 20), (30, 40), (28, 28)]
    _, frames = write_tiny_shards(d, n=5, per_shard=2, sizes=sizes, prefix="val")
    return d, frames


def test_reads_back_what_was_written_once_each(shard_set):
    d, frames = shard_set
    ds = EvalDataset(d)
    assert len(ds) == len(frames)
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        image, label = frames[item["key"]]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3,) + label.shape
        assert item["label"].dtype == torch.int64
        assert np.array_equal(item["label"].numpy(), label)
        assert np.array_equal(to_u8(item["image"]), image)
        seen.append(item["key"])
    assert sorted(seen) == sorted(frames) and len(set(seen)) == len(seen)
    # split over 3 ranks: still every sample exactly once
    keys = [ds[i]["key"] for r in range(3) for i in shard_indices(len(ds), r, 3)]
    assert sorted(keys) == sorted(frames)
    ds2 = pickle.loads(pickle.dumps(ds))  # workers get a copy without open file handles
    assert ds2[1]["key"] == ds[1]["key"]


def test_mapillary_protocol_pads_narrow_portrait_with_ignore():
    image, label = make_frame(60, 20, 4)  # portrait: width 20 -> 32 at height 96
    img, lab = mapillary_protocol(height=96)(image, label)
    assert img.shape == (96, 96, 3) and lab.shape == (96, 96)
    assert (lab[:, :32] == 255).all() and (lab[:, 64:] == 255).all()
    assert (img[:, :32] == 0).all() and (img[:, 64:] == 0).all()
    assert set(np.unique(lab[:, 32:64])) <= set(np.unique(label))  # nearest: no new label values
    # wide frame: centre crop, no padding
    image, label = make_frame(40, 100, 5)
    img, lab = mapillary_protocol(height=80)(image, label)
    assert img.shape == (80, 80, 3) and not (lab == 255).all(axis=0).any()
    img, lab = mapillary_protocol(height=80, crop=False)(image, label)
    assert img.shape == (80, 200, 3) and lab.shape == (80, 200)


def test_mapillary_protocol_released_arithmetic_and_reference_configs():
    """ResizeHeight: width int(w / h x H), PIL bicubic; CenterCrop at round((w' - H) / 2); the
    reference and baseline recipes evaluate Mapillary at 1024 (released), 1536 stays available."""
    from PIL import Image

    from blindseg_dist.config import load_config
    from blindseg_dist.engine.evaluate import resolve_protocol as target_protocol

    image, label = make_frame(30, 100, 6)  # 100 / 30 x 32 = 106.7: int() gives 106, round() 107
    img, lab = mapillary_protocol(height=32, crop=False)(image, label)
    assert img.shape == (32, 106, 3)
    ref = np.asarray(Image.fromarray(image).resize((106, 32), Image.BICUBIC)).astype(int)
    assert np.abs(img.astype(int) - ref).max() <= 1
    assert np.array_equal(lab, np.asarray(Image.fromarray(label).resize((106, 32), Image.NEAREST)))
    img_c, lab_c = mapillary_protocol(height=32)(image, label)
    assert np.array_equal(img_c, img[:, 37:69]) and np.array_equal(lab_c, lab[:, 37:69])  # round(74 / 2) = 37
    for name in ("blindnet_r50_gta5", "baseline_r50_gta5"):
        path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
        cfg = load_config(str(path), [])
        assert target_protocol("mapillary", cfg.eval.targets["mapillary"], cfg.eval.protocols) == "mapillary_1024"
        other = load_config(str(path), ["eval.protocols={mapillary: mapillary_1536}"])
        assert other.eval.protocols["mapillary"] == "mapillary_1536"
    assert resolve_protocol("mapillary_1536").__name__ == "mapillary_protocol_1536_crop"


def test_protocol_by_name_and_in_dataset(shard_set):
    d, frames = shard_set
    assert resolve_protocol("full") is None and resolve_protocol(None) is None
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        resolve_protocol("mapillary")
    ds = EvalDataset(d, protocol="mapillary_32")
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)


class FakeSource:
    """The duck-typed source interface: items of (key, image_path, label_path) + load_pair."""

    def __init__(self, frames):
        self.frames = frames
        self.items = [(k, f"/raw/{k}.png", f"/raw/{k}_label.png") for k in sorted(frames)]

    def load_pair(self, item):
        image, label = self.frames[item[0]]
        return image, label, []


def test_source_mode(shard_set):
    _, frames = shard_set
    ds = EvalDataset(source=FakeSource(frames), protocol=mapillary_protocol(height=16))
    assert len(ds) == len(frames)
    item = ds[0]
    assert item["key"] == sorted(frames)[0] and item["image"].shape == (3, 16, 16)


def test_folder_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="source="):
        EvalDataset(tmp_path)
