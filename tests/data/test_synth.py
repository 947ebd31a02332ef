import json

import numpy as np
import pytest

from blindseg_dist.data import synth
from blindseg_dist.data.labels import CLASS_INDEX
from blindseg_dist.data.sources import get_source

SIZE = (64, 128)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth.generate(out, domains=4, images_per_domain=4, size=SIZE, seed=3,
                             progress=False)
    return out, summary


def test_deterministic_bytes(synth_out, tmp_path):
    out, _ = synth_out
    synth.generate(tmp_path / "b", domains=4, images_per_domain=4, size=SIZE, seed=3,
                   progress=False)
    a, b = _files(out), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 4 * 4 * 2 + 1
    assert all(a[k] == b[k] for k in a)
    synth.generate(tmp_path / "c", domains=1, images_per_domain=2, size=SIZE, seed=4,
                   progress=False)
    assert _files(tmp_path / "c")["gta5/images/00001.png"] != a["gta5/images/00001.png"]


def test_layout_and_readers(synth_out):
    out, summary = synth_out
    assert json.loads((out / "synth.json").read_text()) == summary
    assert [d["name"] for d in summary["domains"]] == ["gta5", "synth_night", "synth_fog",
                                                      "synth_rain"]
    assert (out / "gta5" / "images" / "00004.png").is_file()
    src = get_source("gta5", str(out / "gta5"), split="all")
    assert [it.key for it in src] == ["00001", "00002", "00003", "00004"]
    image, label = src.load_pair(src.items[1])
    ref_img, ref_lab = synth.render_sample(3, 0, 1, SIZE)
    np.testing.assert_array_equal(image, ref_img)
    np.testing.assert_array_equal(label, ref_lab)
    for d, name in enumerate(["synth_night", "synth_fog", "synth_rain"], start=1):
        src = get_source("cityscapes", str(out / name), split="val")
        assert len(src) == 4
        image, label = src.load_pair(src.items[2])
        np.testing.assert_array_equal(label, synth.render_sample(3, d, 2, SIZE)[1])
        assert image.shape == SIZE + (3,)


def test_class_coverage():
    seen = set()
    for d in range(4):
        for i in range(6):
            seen |= set(np.unique(synth.render_sample(0, d, i, SIZE)[1]).tolist())
    seen.discard(255)
    must = {"road", "sidewalk", "building", "pole", "vegetation", "sky", "car", "person"}
    assert {CLASS_INDEX[n] for n in must} <= seen
    assert len(seen) >= 10


def test_layouts_vary_with_seed():
    a = synth.render_sample(0, 0, 0, SIZE)[1]
    b = synth.render_sample(0, 0, 1, SIZE)[1]
    assert (a != b).mean() > 0.1


def test_domains_differ_in_appearance_not_in_layout_statistics():
    n, classes = 12, [CLASS_INDEX[c] for c in ("road", "building", "sky", "vegetation")]
    means = np.zeros((4, len(classes), 3))
    fractions = np.zeros((4, len(classes)))
    for d in range(4):
        sums = np.zeros((len(classes), 3))
        counts = np.zeros(len(classes))
        for i in range(n):
            img, lab = synth.render_sample(1, d, i, SIZE)
            for j, c in enumerate(classes):
                m = lab == c
                sums[j] += img[m].astype(np.float64).sum(0)
                counts[j] += m.sum()
        means[d] = sums / counts[:, None]
        fractions[d] = counts / (n * SIZE[0] * SIZE[1])
    for d in range(1, 4):
        # Every class looks different in every target domain ...
        dist = np.abs(means[d] - means[0]).sum(1)
        assert (dist > 20).all(), (d, dist)
        # ... and not by one global colour shift: per-class differences are not all equal.
        diff = means[d] - means[0]
        assert np.abs(diff - diff.mean(0)).max() > 10
        # ... while the label statistics stay alike.
        assert np.abs(fractions[d] - fractions[0]).max() < 0.12, fractions


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="domains"):
        synth.generate(tmp_path, domains=99, images_per_domain=1, size=SIZE, progress=False)
    with pytest.raises(ValueError, match="domain 42"):
        synth.render_sample(0, 42, 0, SIZE)
