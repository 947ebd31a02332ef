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
from blindseg_dist.tools.corrupt import (EXTRA, SECONDS_PER_IMAGE, SECONDS_PER_IMAGE_1024X2048, STANDARD,
                                         parse_corruptions, parse_severities, sample_seed)
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
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert f"{SECONDS_PER_IMAGE[name]:.3f}" in line and f"{SECONDS_PER_IMAGE_1024X2048[name]:.2f}" in line


def test_corruption_groups_means_and_relative_robustness():
    from blindseg_dist.engine.evaluate import corruption_groups, format_corruption_table

    results = {"clean": {"miou": 0.5}, "f/fog-1": {"miou": 0.4}, "f/fog-3": {"miou": 0.2}, "f/contrast-3": {"miou": 0.3}}
    fams = {"f": {"path": "x", "corrupted_from": "y", "clean": "clean",
                  "members": {"f/fog-1": {"corruption": "fog", "severity": 1},
                              "f/fog-3": {"corruption": "fog", "severity": 3},
                              "f/contrast-3": {"corruption": "contrast", "severity": 3}}}}
    g = corruption_groups(results, fams)["f"]
    assert g["corruptions"]["fog"] == {"miou": {"1": 0.4, "3": 0.2}, "mean": pytest.approx(0.3)}
    assert g["mpc"] == pytest.approx(0.3) and g["relative_robustness"] == pytest.approx(0.6)
    assert g["severities"] == [1, 3] and g["clean_miou"] == 0.5
    text = format_corruption_table({"f": g})
    assert "mPC" in text and "30.00" in text and "60.00" in text
    fams["f"]["clean"] = None
    assert corruption_groups(results, fams)["f"]["relative_robustness"] is None


def test_eval_reads_and_groups_a_corrupted_family(corrupted, tmp_path, capsys):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, shards, out = corrupted
    fam = shutil.copytree(out, tmp_path / "fam")
    assert main(["corrupt", str(shards["train"]), "--out", str(fam), "--corruptions", "contrast",
                 "--severities", "1"]) == 0
    run = tmp_path / "run"
    make_checkpoint(run)
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(run), "--data", f"src-c={fam}", f"src={shards['train']}",
               "--json", str(tmp_path / "eval.json"), "--tb-dir", str(tmp_path / "tb")])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    t = report["targets"]
    assert set(t) == {"src", "src-c/gaussian_noise-3", "src-c/contrast-1", "src-c/contrast-3"}
    g = report["corruptions"]["src-c"]
    assert list(g["corruptions"]) == ["gaussian_noise", "contrast"]  # the package's order
    assert g["corruptions"]["contrast"]["miou"] == {"1": t["src-c/contrast-1"]["miou"], "3": t["src-c/contrast-3"]["miou"]}
    want = np.mean([t["src-c/gaussian_noise-3"]["miou"],
                    np.mean([t["src-c/contrast-1"]["miou"], t["src-c/contrast-3"]["miou"]])])
    assert g["mpc"] == pytest.approx(want)
    assert g["clean"] == "src" and g["relative_robustness"] == pytest.approx(want / t["src"]["miou"])
    assert "src-c: mIoU (%) per corruption and severity" in printed and "relative robustness" in printed
    assert "src-c/contrast-3" not in printed  # the sets appear grouped, not as rows of the per-target table
    assert (tmp_path / "eval-confusion-src-c_contrast-3.png").is_file()
    n_valid = sum(int((lab != 255).sum()) for _, lab in _frames(out / "contrast-3").values())
    assert t["src-c/contrast-3"]["num_pixels"] == n_valid > 3 * 48 * 96 // 2  # every frame read
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = acc.Tags()["scalars"]
    assert {"mpc/src-c", "relative_robustness/src-c", "corruption/src-c/contrast",
            "corruption/src-c/contrast/s1", "miou/src-c/contrast-3"} <= set(tags)
    assert acc.Scalars("mpc/src-c")[0].value == pytest.approx(want, abs=1e-6)

    # `blindseg report`: the family is one column (its mPC), its grouped table follows
    from blindseg_dist.tools.report import comparison_table, load_run

    r = load_run(tmp_path / "eval.json")
    header, rows = comparison_table([r])
    assert header[1:4] == ["src", "src-c mPC", "mean"] and rows[0][2] == pytest.approx(want)
    assert main(["report", str(tmp_path / "eval.json"), "--out", str(tmp_path / "rep"), "--no-flops"]) == 0
    assert "src-c mPC" in (tmp_path / "rep" / "report.md").read_text()
    assert "| mPC |" in (tmp_path / "rep" / "report.md").read_text()


def test_help_table_is_the_bench_result_and_the_bench_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name, size, table in (("corruption_speed.json", [192, 384], SECONDS_PER_IMAGE),
                              ("corruption_speed_1024x2048.json", [1024, 2048], SECONDS_PER_IMAGE_1024X2048)):
        recorded = json.loads((root / "bench" / "results" / name).read_text())
        assert recorded["size"] == size and recorded["severity"] == 3
        assert {r["corruption"]: round(r["seconds_per_image"], 4) for r in recorded["rows"]} == table
    spec = importlib.util.spec_from_file_location("corruption_speed", root / "bench" / "corruption_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    assert bench.main(["--size", "40x64", "--images", "1", "--repeats", "1", "--corruptions", "contrast,pixelate",
                       "--out", str(out)]) == 0
    assert json.loads(out.read_text())["size"] == [40, 64]
    rows = json.loads(out.read_text())["rows"]
    assert [r["corruption"] for r in rows] == ["contrast", "pixelate"] and all(r["seconds_per_image"] > 0 for r in rows)


def test_workers_write_the_same_bytes(corrupted, tmp_path):
    root, shards, out = corrupted
    assert main(["corrupt", str(shards["train"]), "--out", str(tmp_path / "w"), "--corruptions", "gaussian_noise",
                 "--severities", "3", "--workers", "2"]) == 0
    one = {p.name: p.read_bytes() for p in (out / "gaussian_noise-3").glob("*.tar")}
    two = {p.name: p.read_bytes() for p in (tmp_path / "w" / "gaussian_noise-3").glob("*.tar")}
    assert len(one) >= 2 and one == two


def test_a_set_started_from_another_input_is_written_anew(corrupted, tmp_path):
    from blindseg_dist.data.shards import write_shards
    from blindseg_dist.data.sources import get_source
    from blindseg_dist.data.synth import generate

    root, shards, out = corrupted
    generate(tmp_path / "other", domains=1, images_per_domain=3, size=(48, 96), seed=7, progress=False)
    other = tmp_path / "other-shards"  # the same keys as the fixture's set, other pixels
    write_shards(get_source("gta5", tmp_path / "other" / "gta5", split="all"), other, samples_per_shard=2,
                 progress=False)
    assert sorted(_frames(other)) == sorted(_frames(shards["train"]))
    dest = tmp_path / "c"
    args = ["--out", str(dest), "--corruptions", "contrast", "--severities", "3"]
    assert main(["corrupt", str(shards["train"]), *args]) == 0
    (dest / "contrast-3" / "manifest.json").unlink()  # interrupted before its manifest...
    assert main(["corrupt", str(other), *args]) == 0  # ...then asked for another input: no shard of the first kept
    got, want = _frames(dest / "contrast-3"), _frames(other)
    for key, (img, _) in got.items():
        ref = imagecorruptions.corrupt(want[key][0], corruption_name="contrast", severity=3)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    assert json.loads((dest / "contrast-3" / "manifest.json").read_text())["corrupted_from"] == str(other.resolve())
