"""`blindseg report`: comparison table (printed, md, csv), bar chart PNG, cached fvcore figures; the
demo's closing table is the same table."""
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from blindseg_dist.cli import main
from blindseg_dist.config import load_config, save_config
from blindseg_dist.engine.evaluate import target_result
from blindseg_dist.tools.report import print_report
from tests.engine._eval_fixtures import DEMO_CONFIG


def _result(diag: dict[int, int], off: dict[tuple[int, int], int], protocol="full") -> dict:
    cm = torch.zeros(19, 19, dtype=torch.int64)
    for c, v in diag.items():
        cm[c, c] = v
    for (a, b), v in off.items():
        cm[a, b] = v
    return target_result(cm, protocol=protocol)


def _run(folder: Path, targets: dict, backbone="resnet18") -> Path:
    folder.mkdir(parents=True)
    save_config(load_config(DEMO_CONFIG, [f"model.backbone={backbone}"]), folder / "config.yaml")
    (folder / "eval.json").write_text(json.dumps({"world_size": 1, "targets": targets}))
    return folder


def test_report_table_csv_png_and_flops_cache(tmp_path, capsys):
    a = _run(tmp_path / "a" / "run", {"night": _result({0: 8, 10: 4}, {(0, 1): 2}),
                                      "synthia": _result({0: 5}, {(0, 9): 5}, "synthia")})
    b = _run(tmp_path / "b" / "run", {"night": _result({0: 4, 10: 4}, {(0, 1): 4})})
    out = tmp_path / "report"
    rc = main(["report", str(a), str(b), "--out", str(out), "--flops-size", "64x128"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "a/run" in printed and "b/run" in printed  # same folder names: disambiguated
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in rows] == ["a/run", "b/run"]
    # a: night IoU road 8/10, sky 1, sidewalk 0 -> mean 0.6; synthia: road 0.5, terrain 0 -> 0.25; 16 cl.: 0.5
    assert float(rows[0]["night"]) == pytest.approx(60.0, abs=1e-3)
    assert float(rows[0]["synthia"]) == pytest.approx(25.0, abs=1e-3)
    assert float(rows[0]["synthia (16 cl.)"]) == pytest.approx(50.0, abs=1e-3)
    assert float(rows[0]["mean"]) == pytest.approx(42.5, abs=1e-3)
    assert rows[1]["synthia"] == "" and float(rows[1]["mean"]) == pytest.approx(float(rows[1]["night"]))
    assert float(rows[0]["params (M)"]) > 1 and float(rows[0]["GFLOPs @64x128"]) > 0
    md = (out / "report.md").read_text()
    assert "| a/run | 60.00 | 25.00 | 50.00 | 42.50 |" in md and "report.png" in md and "IoU per class" in md
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    cache = a / "flops.json"
    assert json.loads(cache.read_text())["value"]["size"] == [64, 128]
    mtime = cache.stat().st_mtime_ns
    assert main(["report", str(a), "--out", str(out), "--flops-size", "64x128"]) == 0
    assert cache.stat().st_mtime_ns == mtime  # cached, not recounted


def test_report_reads_demo_output_and_demo_prints_the_same_table(tmp_path, capsys):
    demo = tmp_path / "demo_out"
    run = _run(demo / "run", {"source": _result({0: 10}, {}), "night": _result({0: 5}, {(0, 1): 5}),
                              "fog": _result({0: 9, 1: 1}, {})})
    report = {"world_size": 2, "targets": json.loads((run / "eval.json").read_text())["targets"],
              "checkpoint": str(run / "checkpoints" / "4"), "eval_data": {}, "config": str(run / "config.yaml"),
              "tensorboard": str(run / "tb"), "timings": {"train_s": 3.0}, "unseen": ["night", "fog"]}
    (demo / "report.json").write_text(json.dumps(report))
    print_report(report)
    demo_out = capsys.readouterr().out
    assert main(["report", str(demo), "--out", str(tmp_path / "r"), "--no-flops"]) == 0
    report_out = capsys.readouterr().out
    table = report_out.split("[report]")[0].strip()
    assert table in demo_out and "mean unseen" in table
    # mean over the unseen targets only: night 0.25 (road .5, sidewalk 0), fog 1.0
    assert "62.50" in table.splitlines()[-1] and "Results (world size 2" in demo_out


def test_report_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "neither report.json nor eval.json" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval.json").write_text("{}")
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "r")]) == 2
    assert "no 'targets'" in capsys.readouterr().err


def test_report_reads_training_records_and_labels_unseen_selection(tmp_path, capsys):
    """A run evaluated only during training: report takes the best checkpoint's row of eval.jsonl and
    shows steps, loss and images/s from metrics.jsonl, and marks a selection on an unseen target."""
    from blindseg_dist.engine import records

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(DEMO_CONFIG), run / "config.yaml")
    for step, loss in ((1, 2.0), (2, 1.5)):
        records.append_jsonl(run / "metrics.jsonl", records.metrics_row(step, {"loss/total": loss, "images_per_s": 4.0}))
    good, bad = _result({0: 8, 10: 4}, {(0, 1): 2}), _result({0: 4}, {(0, 1): 4})
    records.append_jsonl(run / "eval.jsonl", records.eval_row(1, {"night": good}, "night", True))
    records.append_jsonl(run / "eval.jsonl", records.eval_row(2, {"night": bad}, "night", True))
    (run / "best.json").write_text(json.dumps({"step": 1, "checkpoint": str(run / "checkpoints/1"),
                                               "selection": "night", "miou": good["miou"],
                                               "selection_is_unseen_target": True}))
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out), "--no-flops"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert float(rows[0]["night"]) == pytest.approx(60.0, abs=1e-3)  # the best step's row, not the last
    md = (out / "report.md").read_text()
    assert "| run | 2 | 1.5000 | 4.0 | 1 | night (UNSEEN target) |" in md, md
    assert "night (UNSEEN target)" in printed
