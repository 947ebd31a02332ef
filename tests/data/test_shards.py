import json
import tarfile

import cv2
import numpy as np
import pytest
import webdataset as wds

import blindseg_dist
from blindseg_dist.data.shards import class_stats, load_manifest, verify_shards, write_shards
from blindseg_dist.data.sources import get_source
from tests.data._dataset_formats import CS_IDS, ids, rgb, save_gray_png, save_jpg, save_rgb_png

BAD_KEYS = {"frankfurt_000000_000003", "frankfurt_000000_000004", "frankfurt_000000_000005"}


@pytest.fixture
def cs_source(tmp_path):
    """Cityscapes val with 7 good pairs, one size mismatch, one out-of-table id, one broken
    image file."""
    root = tmp_path / "cs"

    def pair(frame, image, label):
        stem = f"frankfurt_000000_{frame:06d}"
        save_rgb_png(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", image)
        save_gray_png(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", label)

    for f in (0, 1, 2, 6, 7, 8, 9):
        pair(f, rgb(f), ids(f, CS_IDS))
    pair(3, rgb(3), ids(3, CS_IDS, h=11))  # size mismatch
    bad = ids(4, CS_IDS)
    bad[5, 5] = 77
    pair(4, rgb(4), bad)  # id outside the Cityscapes table
    pair(5, rgb(5), ids(5, CS_IDS))
    (root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000005_leftImg8bit.png"
     ).write_bytes(b"\x89PNG broken")
    return get_source("cityscapes", str(root), split="val")


def _read_tar(path):
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, field = m.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    return samples


def _decode_png(data, flags):
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def test_write_and_read_back_exactly(cs_source, tmp_path):
    out = tmp_path / "shards"
    m = write_shards(cs_source, out, samples_per_shard=3, progress=False, shuffle_seed=None)
    assert m["format"] == "blindseg-shards/2" and m["tool_version"] == blindseg_dist.__version__
    assert m["shuffle_seed"] is None and m["centroid_tile"] == 1024
    assert (m["dataset"], m["split"], m["label_map"], m["image_format"]) == \
        ("cityscapes", "val", "cityscapes_ids", "png")
    # 10 pairs -> chunks of 3 by sorted key (shuffle_seed=None); 3 bad ones (all of chunk 1) skipped, never
    # replaced: chunk 1 leaves no tar, only its sidecar.
    assert {s["key"] for s in m["skipped"]} == BAD_KEYS
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert "size mismatch" in reasons["frankfurt_000000_000003"]
    assert "[77]" in reasons["frankfurt_000000_000004"]
    assert "unreadable image" in reasons["frankfurt_000000_000005"]
    assert [s["name"] for s in m["shards"]] == [f"cityscapes-val-{i:06d}.tar" for i in (0, 2, 3)]
    assert [s["count"] for s in m["shards"]] == [3, 3, 1] and m["num_samples"] == 7
    assert not (out / "cityscapes-val-000001.tar").exists()
    assert json.loads((out / "cityscapes-val-000001.json").read_text())["count"] == 0
    assert any("only 3 shards" in w for w in m["warnings"])
    assert any("3 pairs skipped" in w for w in m["warnings"])
    assert load_manifest(out) == m
    by_key = {it.key: it for it in cs_source}
    seen = []
    for shard in m["shards"]:
        tar = _read_tar(out / shard["name"])
        assert len(tar) == shard["count"]
        for key, fields in tar.items():
            assert set(fields) == {"image.png", "label.png", "meta.json"}
            image, label = cs_source.load_pair(by_key[key])
            np.testing.assert_array_equal(
                _decode_png(fields["image.png"], cv2.IMREAD_COLOR)[..., ::-1], image)
            lab = _decode_png(fields["label.png"], cv2.IMREAD_UNCHANGED)
            assert lab.ndim == 2 and lab.dtype == np.uint8
            np.testing.assert_array_equal(lab, label)
            meta = json.loads(fields["meta.json"])
            entry = next(s for s in m["samples"] if s["key"] == key)
            assert entry["shard"] == shard["name"]
            assert meta == {k: entry[k] for k in ("key", "size", "class_pixels", "centroids")}
            assert meta["size"] == [12, 20]
            assert sum(meta["class_pixels"].values()) == int((label != 255).sum())
            seen.append(key)
    assert seen == sorted(set(by_key) - BAD_KEYS)


def test_webdataset_reads_our_shards(cs_source, tmp_path):
    m = write_shards(cs_source, tmp_path / "s", samples_per_shard=4, progress=False)
    urls = [str(tmp_path / "s" / s["name"]) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    keys = []
    by_key = {it.key: it for it in cs_source}
    for sample in ds:
        keys.append(sample["__key__"])
        image, label = cs_source.load_pair(by_key[sample["__key__"]])
        np.testing.assert_array_equal(sample["image.png"], image)
        assert sample["meta.json"]["key"] == sample["__key__"]
    assert keys == [s["key"] for s in m["samples"]]


def test_class_stats_matches_brute_force():
    lab = ids(3, [0, 2, 5, 13, 255], h=9, w=14)
    pixels, cents = class_stats(lab, tile=4)
    for c in (0, 2, 5, 13):
        assert pixels[str(c)] == int((lab == c).sum())
        expected = []
        for y0 in range(0, 9 - 4 + 1, 4):  # whole tiles only
            for x0 in range(0, 14 - 4 + 1, 4):
                yy, xx = np.nonzero(lab[y0:y0 + 4, x0:x0 + 4] == c)
                if len(yy):
                    expected.append([y0 + int(np.mean(yy)), x0 + int(np.mean(xx))])
        assert cents[str(c)] == expected
    assert "255" not in pixels


def test_resume_rewrites_only_missing(cs_source, tmp_path):
    out = tmp_path / "s"
    first = write_shards(cs_source, out, samples_per_shard=3, progress=False)
    blobs = {s["name"]: (out / s["name"]).read_bytes() for s in first["shards"]}
    stamps = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in first["shards"]}
    (out / "cityscapes-val-000002.tar").unlink()
    stray = out / "cityscapes-val-000003.tar.tmp-99999"
    stray.write_bytes(b"half a shard")
    (out / "manifest.json").unlink()  # interrupted before the manifest
    second = write_shards(cs_source, out, samples_per_shard=3, progress=False)
    assert second == first
    assert not stray.exists()
    for name, stamp in stamps.items():
        now = (out / name).stat().st_mtime_ns
        assert (now != stamp) == (name == "cityscapes-val-000002.tar"), name
        assert (out / name).read_bytes() == blobs[name]  # byte-identical rewrite
    assert verify_shards(out)["ok"]


def test_corrupt_shard_is_detected_and_rewritten(cs_source, tmp_path):
    out = tmp_path / "s"
    first = write_shards(cs_source, out, samples_per_shard=3, progress=False)
    path = out / "cityscapes-val-000000.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_shards(out)
    assert not report["ok"] and report["bad"] == [{"name": path.name, "reason": "sha256 mismatch"}]
    assert write_shards(cs_source, out, samples_per_shard=3, progress=False) == first
    assert verify_shards(out)["ok"]


def test_parallel_workers_match_serial(cs_source, tmp_path):
    serial = write_shards(cs_source, tmp_path / "a", samples_per_shard=2, progress=False)
    parallel = write_shards(cs_source, tmp_path / "b", samples_per_shard=2, workers=2,
                            progress=False)
    assert parallel == serial
    for s in serial["shards"]:
        a, b = tmp_path / "a" / s["name"], tmp_path / "b" / s["name"]
        assert a.read_bytes() == b.read_bytes()


def test_replan_removes_stale_shards_and_threshold(cs_source, tmp_path):
    out = tmp_path / "s"
    write_shards(cs_source, out, samples_per_shard=1, progress=False)
    m = write_shards(cs_source, out, samples_per_shard=5, progress=False, min_shards=2)
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == [s["name"] for s in m["shards"]] == ["cityscapes-val-000000.tar",
                                                         "cityscapes-val-000001.tar"]
    assert not any("shards (<" in w for w in m["warnings"])


def test_jpg_passthrough_and_progress_summary(tmp_path, capsys):
    root = tmp_path / "bdd"
    for n in range(2):
        save_jpg(root / "seg" / "images" / "val" / f"img{n}.jpg", rgb(n))
        save_gray_png(root / "seg" / "labels" / "val" / f"img{n}_train_id.png",
                      ids(n, [0, 13, 255]))
    src = get_source("bdd100k", str(root), split="val")
    m = write_shards(src, tmp_path / "s", image_format="jpg", progress=True)
    tar = _read_tar(tmp_path / "s" / m["shards"][0]["name"])
    assert tar["img1"]["image.jpg"] == (root / "seg" / "images" / "val" / "img1.jpg").read_bytes()
    assert m["label_map"] == "bdd100k_trainids" and m["image_format"] == "jpg"
    out = capsys.readouterr().out
    assert "2 samples in 1 shards" in out and "0 skipped" in out


def test_errors(tmp_path, cs_source):
    with pytest.raises(FileNotFoundError, match="no manifest.json in"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="image_format"):
        write_shards(cs_source, tmp_path / "x", image_format="webp")


def test_shuffled_sample_order_is_seeded_and_recorded(cs_source, tmp_path):
    """Shards hold a seeded permutation of the split (consecutive frame ids are video-like)."""
    a = write_shards(cs_source, tmp_path / "a", samples_per_shard=2, progress=False)
    b = write_shards(cs_source, tmp_path / "b", samples_per_shard=2, progress=False)
    c = write_shards(cs_source, tmp_path / "c", samples_per_shard=2, progress=False, shuffle_seed=5)
    keys = lambda m: [s["key"] for s in m["samples"]]  # noqa: E731
    good = sorted({it.key for it in cs_source} - BAD_KEYS)
    assert a["shuffle_seed"] == 0 and c["shuffle_seed"] == 5
    assert keys(a) == keys(b) and sorted(keys(a)) == sorted(keys(c)) == good
    assert keys(a) != good and keys(c) != keys(a)  # not key order, and the seed matters
    for m, d in ((a, "a"), (c, "c")):  # the manifest's order is the tars' member order
        order = []
        for sh in m["shards"]:
            with tarfile.open(tmp_path / d / sh["name"]) as tar:
                order += [n.name.split(".", 1)[0] for n in tar.getmembers()][::3]
        assert order == keys(m)
    again = write_shards(cs_source, tmp_path / "a", samples_per_shard=2, progress=False)
    assert again == a  # a rerun with the recorded seed keeps every shard
