"""`blindseg corrupt`: the package's own output stored losslessly with the keys and labels kept, one
seed per image (a rerun and a resumed run write the same bytes), names checked, and `blindseg eval`
reads the sets it writes."""
from __future__ import annotations

import json

import imagecorruptions
import numpy as np
import pytest

from blindseg_dist.cli import main
from blindseg_dist.data.evalset import EvalDataset
from blindseg_dist.tools.corrupt import (EXTRA, SECONDS_PER_IMAGE, STANDARD, parse_corruptions, parse_severities,
                                         sample_seed)
from tests.engine._eval_fixtures import make_checkpoint, make_shards


def _frames(path) -> dict:
    ds = EvalDataset(path)
    return {key: (img, lab) for img, lab, key in (ds.load_raw(i) for i in range(len(ds)))}


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    shards = make_shards(root, images=3, size=(48, 96))  # the demo's path: synth -> gta5 shards
    out = root / "c"
    rc = main(["corrupt", str(shards["train"]), "--out", str(out), "--corruptions", "contrast,gaussian_noise",
               "--severities", "3"])
    assert rc == 0
    return root, shards, out


def test_contrast_equals_the_package_keys_and_labels_kept(corrupted):
    root, shards, out = corrupted
    clean = _frames(shards["train"])
    for name in ("contrast", "gaussian_noise"):
        manifest = json.loads((out / f"{name}-3" / "manifest.json").read_text())
        assert manifest["corruption"] == name and manifest["severity"] == 3
        assert manifest["corruption_package"].startswith("imagecorruptions")
        assert manifest["image_format"] == "png" and manifest["dataset"] == "gta5"
        got = _frames(out / f"{name}-3")
        assert sorted(got) == sorted(clean) and len(got) == 3
        for key, (img, lab) in got.items():
            orig_img, orig_lab = clean[key]
            np.testing.assert_array_equal(lab, orig_lab)
            if name == "contrast":  # no randomness: the package's output on the original, to the grey level
                want = imagecorruptions.corrupt(orig_img, corruption_name="contrast", severity=3)
                assert np.abs(img.astype(int) - want.astype(int)).max() <= 1
                assert np.abs(img.astype(int) - orig_img.astype(int)).max() > 10  # and really corrupted
            else:  # random: the package's output under the image's seed, exactly
                np.random.seed(sample_seed(key, name, 3))
                want = imagecorruptions.corrupt(orig_img, corruption_name=name, severity=3)
                np.testing.assert_array_equal(img, want)
    index = json.loads((out / "corruptions.json").read_text())
    assert {(r["corruption"], r["severity"]) for r in index["sets"]} == {("contrast", 3), ("gaussian_noise", 3)}


def test_eval_reads_a_corrupted_set(corrupted, tmp_path):
    root, shards, out = corrupted
    run = tmp_path / "run"
    make_checkpoint(run)
    rc = main(["eval", "--checkpoint", str(run), "--data", f"contrast={out / 'contrast-3'}",
               "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())["targets"]["contrast"]
    assert res["num_pixels"] == 3 * 48 * 96 - sum(int((lab == 255).sum()) for _, lab in _frames(out / "contrast-3").values())


def test_rerun_skips_and_resume_rewrites_identical_bytes(corrupted, capsys):
    root, shards, out = corrupted
    tars = {p: p.read_bytes() for p in sorted((out / "gaussian_noise-3").glob("*.tar"))}
    assert len(tars) >= 2
    capsys.readouterr()
    args = ["corrupt", str(shards["train"]), "--out", str(out), "--corruptions", "gaussian_noise,contrast",
            "--severities", "3"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("severity 3 already complete") == 2
    # an interrupted set: no manifest, one shard gone -> finished with the same bytes
    (out / "gaussian_noise-3" / "manifest.json").unlink()
    first = next(iter(tars))
    first.unlink()
    assert main(args) == 0
    assert "(1 written, 1 reused)" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted((out / "gaussian_noise-3").glob("*.tar"))} == tars
    assert json.loads((out / "gaussian_noise-3" / "manifest.json").read_text())["corruption"] == "gaussian_noise"


def test_raw_folder_input_keeps_its_keys(corrupted, tmp_path):
    root, shards, out = corrupted
    raw = f"cityscapes:{root / 'synth' / 'synth_night'}"
    assert main(["corrupt", raw, "--out", str(tmp_path / "c"), "--corruptions", "pixelate", "--severities", "2"]) == 0
    got = _frames(tmp_path / "c" / "pixelate-2")
    assert sorted(got) == sorted(_frames(shards["night"]))
    assert json.loads((tmp_path / "c" / "pixelate-2" / "manifest.json").read_text())["dataset"] == "cityscapes"


def test_names_severities_and_help(tmp_path, capsys):
    assert parse_corruptions("all") == list(STANDARD) == imagecorruptions.get_corruption_names("common")
    assert list(EXTRA) == imagecorruptions.get_corruption_names("validation")
    assert parse_corruptions("saturate,all")[0] == "saturate" and len(parse_corruptions("saturate,all")) == 16
    assert parse_severities("all") == [1, 2, 3, 4, 5] and parse_severities("5,3,3") == [3, 5]
    rc = main(["corrupt", str(tmp_path), "--out", str(tmp_path / "o"), "--corruptions", "contrast,fogg",
               "--severities", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "fogg" in err and all(n in err for n in STANDARD + EXTRA)
    assert main(["corrupt", str(tmp_path), "--out", str(tmp_path / "o"), "--corruptions", "fog",
                 "--severities", "6"]) == 2
    assert main(["corrupt", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--corruptions", "fog",
                 "--severities", "1"]) == 2
    with pytest.raises(SystemExit):
        main(["corrupt", "--help"])
    text = capsys.readouterr().out
    for name in STANDARD + EXTRA:
        assert f"{SECONDS_PER_IMAGE[name]:.3f}" in next(line for line in text.splitlines()
                                                       if line.strip().startswith(name + " "))
