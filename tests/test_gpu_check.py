"""bench/gpu_check.sh: its CPU smoke mode runs every section (CI keeps the GPU script from rotting)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # ~1 min of CPU; slack for a shared machine


def test_cpu_smoke_runs_every_section_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = _run("--cpu-smoke", "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["profile"] == "cpu-smoke" and res["device"] == "cpu"
    assert res["correctness_pass"] is True
    names = set(res["correctness"])
    assert {"cwcl_global_paper", "sdcl_global", "cml_batch", "model_objective_step"} <= names
    assert all(v["max_rel_err"] <= 1e-4 for v in res["correctness"].values())
    for k in ("fp32", "bf16_channels_last"):
        assert res["throughput"][k]["images_per_s"] > 0
    assert res["step_overhead"]["blindnet_over_two_view_ce"] > 0
    assert res["eval"]["images_per_s"] > 0 and res["eval"]["pred_shape"] == [1, *res["eval"]["size"]]
    assert all(v["samples_per_s"] > 0 for v in res["loader"]["by_workers"].values())
    assert "GPU check (cpu-smoke" in r.stdout and "correctness/sdcl_global" in r.stdout
    hs = res["host_syncs"]
    assert hs["sampling_in_the_losses"]["by_unit"]["cwcl"] > 0
    assert "cwcl" not in hs["loader_plans"]["by_unit"]  # CWCL planned in the loader: no host sync
    assert hs["loader_plans"]["total"] < hs["sampling_in_the_losses"]["total"]
    assert res["compile"]["backend"] == "aot_eager" and res["compile"]["graph_breaks_total"] == 0
    assert res["compile"]["compiled_over_eager"] > 0
    assert "host syncs/step, loader_plans" in r.stdout and "compile graph breaks" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full check would run")
def test_full_mode_without_a_gpu_says_so(tmp_path):
    r = _run("--out", str(tmp_path / "x.json"), tmp_path=tmp_path)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "--cpu-smoke" in r.stderr
    assert not (tmp_path / "x.json").exists()
