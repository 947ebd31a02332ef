"""`blindseg ablate` on the tiny grid (2 entries) x 2 seeds: real training runs in subprocesses, a mean ±
std table (md + csv), HParams in every run's TensorBoard folder, and a rerun that skips finished runs."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from blindseg_dist.config import ConfigError
from blindseg_dist.tools.ablate import load_grid, plan_runs
from tests.engine._eval_fixtures import DEMO_CONFIG, make_shards


def _ablate(out: Path, shards: dict, env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blindseg_dist", "ablate", "--config", str(DEMO_CONFIG), "--seeds", "2",
           "--grid", "tiny", "--output-dir", str(out), f"data.train={shards['train']}", "data.crop_size=64",
           "data.batch_size=2", "data.num_workers=0", "optim.max_steps=2", "run.log_every=1",
           f"eval.targets={{night: {shards['night']}}}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _hparams(tb: Path) -> dict:
    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    hp = {k: (v.number_value if v.HasField("number_value") else v.bool_value if v.HasField("bool_value")
              else v.string_value) for k, v in info.hparams.items()}
    return {"hparams": hp, "metrics": [m.name.tag for m in exp.metric_infos]}


def test_ablation_tiny_grid_two_seeds_and_resume(tmp_path):
    shards = make_shards(tmp_path / "data", images=4)
    out = tmp_path / "abl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = _ablate(out, shards, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("training ... done") == 4 and "[4/4] all four seed 1" in proc.stdout

    runs = {(e, s): out / "runs" / e / f"seed{s}" for e in ("baseline", "all_four") for s in (0, 1)}
    miou = {k: json.loads((d / "eval.json").read_text())["targets"]["night"]["miou"] for k, d in runs.items()}
    rows = {r["run"]: r for r in csv.DictReader((out / "ablation.csv").open())}
    assert set(rows) == {"baseline", "all four"}
    for entry, slug in (("baseline", "baseline"), ("all four", "all_four")):
        vals = [100 * miou[(slug, s)] for s in (0, 1)]
        assert rows[entry]["seeds"] == "2"
        assert float(rows[entry]["night mean"]) == pytest.approx(np.mean(vals), abs=1e-3)
        assert float(rows[entry]["night std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-3)
        assert float(rows[entry]["mean mean"]) == pytest.approx(np.mean(vals), abs=1e-3)  # one target
    md = (out / "ablation.md").read_text()
    assert "| baseline | 2 |" in md and "±" in md and "| all four | 2 |" in md
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000  # the bar chart with error bars
    # the seeds really differ (run.seed = base + i) and the grid values reached the runs
    import yaml
    cfg = {k: yaml.safe_load((d / "config.yaml").read_text()) for k, d in runs.items()}
    assert cfg[("baseline", 1)]["run"]["seed"] == cfg[("baseline", 0)]["run"]["seed"] + 1
    assert cfg[("baseline", 0)]["loss"]["two_view"] is False and cfg[("all_four", 0)]["loss"]["sdcl"] == 0.3

    # HParams dashboard data: loss weights / scopes as hparams, per-target mIoU as metrics
    hp = _hparams(runs[("all_four", 1)] / "tb")
    assert hp["hparams"]["loss.cml"] == pytest.approx(0.2) and hp["hparams"]["loss.two_view"] == "True"
    assert hp["hparams"]["loss.contrastive_scope"] == "image" and hp["hparams"]["entry"] == "all four"
    assert "hparam/miou/night" in hp["metrics"] and "hparam/miou/mean" in hp["metrics"]
    assert _hparams(runs[("baseline", 0)] / "tb")["hparams"]["loss.two_view"] == "False"

    # rerun: nothing retrained, tables rebuilt
    mtimes = {k: (d / "eval.json").stat().st_mtime_ns for k, d in runs.items()}
    (out / "ablation.md").unlink()
    proc2 = _ablate(out, shards, env)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-5000:]
    assert proc2.stdout.count("skipped (eval.json exists)") == 4 and "training ... done" not in proc2.stdout
    assert {k: (d / "eval.json").stat().st_mtime_ns for k, d in runs.items()} == mtimes
    assert (out / "ablation.md").read_text() == md


def test_grid_and_plan_errors(tmp_path):
    desc, entries = load_grid("default")
    assert [e.name for e in entries] == ["baseline", "CE both views", "+CML", "+CML+CCL", "+CWCL", "+SDCL",
                                         "+CWCL+SDCL", "all four"]
    base = entries[0].values
    assert base["loss.two_view"] is False and all(base[f"loss.{k}"] == 0 for k in ("cml", "ccl", "cwcl", "sdcl"))
    with pytest.raises(ConfigError, match="eval.targets is empty"):
        plan_runs(DEMO_CONFIG, entries, 1, tmp_path)
    with pytest.raises(ConfigError, match=r"clash with the grid entry 'baseline'"):
        plan_runs(DEMO_CONFIG, entries, 1, tmp_path, ["eval.targets={a: /x}", "loss.cml=0.5"])
    with pytest.raises(ConfigError, match="unknown ablation grid 'nope'"):
        load_grid("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  - name: x\n    set: {loss.cml: -1}\n")
    _, bad_entries = load_grid(bad)
    with pytest.raises(ConfigError, match="grid entry 'x'.*loss.cml"):
        plan_runs(DEMO_CONFIG, bad_entries, 1, tmp_path, ["eval.targets={a: /x}"])
    plan = plan_runs(DEMO_CONFIG, entries, 3, tmp_path, ["eval.targets={a: /x}"])
    assert len(plan) == 24 and plan[5].run_dir == tmp_path / "runs" / "ce_both_views" / "seed2"


def test_a_finished_run_without_eval_json_is_evaluated_on_rerun_not_trained(tmp_path, capsys):
    # killed after its final checkpoint, before eval.json: the rerun evaluates that checkpoint only
    from blindseg_dist.tools.ablate import execute_plan

    shards = make_shards(tmp_path / "data", images=4)
    overrides = [f"data.train={shards['train']}", "data.crop_size=64", "data.batch_size=2", "data.num_workers=0",
                 "optim.max_steps=2", "run.log_every=1", "run.threads=1", f"eval.targets={{night: {shards['night']}}}"]
    _, entries = load_grid("tiny")
    plan = plan_runs(str(DEMO_CONFIG), entries[:1], 1, tmp_path / "abl", overrides)
    results, status = execute_plan(plan, str(DEMO_CONFIG))
    run_dir = plan[0].run_dir
    assert status["trained"] == [str(run_dir)] and not status["failed"], (run_dir / "train.log").read_text()[-3000:]
    first = json.loads((run_dir / "eval.json").read_text())["targets"]["night"]["miou"]
    ckpt_files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    assert any(p.parent.name == "2" for p in ckpt_files)
    (run_dir / "eval.json").unlink()

    results, status = execute_plan(plan, str(DEMO_CONFIG))
    log = (run_dir / "eval.log").read_text() if (run_dir / "eval.log").is_file() else ""
    assert status["evaluated"] == [str(run_dir)] and not status["failed"] and not status["trained"], log[-3000:]
    printed = capsys.readouterr()
    assert "final checkpoint evaluated (no training)" in printed.out + printed.err
    again = json.loads((run_dir / "eval.json").read_text())["targets"]["night"]["miou"]
    assert results[run_dir]["night"]["miou"] == again == pytest.approx(first, abs=1e-6)
    # no training: the checkpoints are untouched, and no train.log of a second run
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "checkpoints").rglob("*")
            if p.is_file()} == ckpt_files
    assert "[train]" not in log
