"""The step-cost and communication benches run end to end at tiny sizes (their figures come from
full-size runs, docs/BENCHMARKS.md; here only that they work and record what they claim)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THP = os.environ.get("THP_MEM_ALLOC_ENABLE", "1")  # the benches apply blindseg's default where unset


def _run(args: list[str], timeout: int = 600) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_step_overhead_records_faults_allocator_and_counts_the_covariance_node(tmp_path):
    res = tmp_path / "so.json"
    _run(["bench/step_overhead.py", "--backbone", "resnet18", "--crop", "64", "--rounds", "1", "--warmup", "0",
          "--threads", "1", "--profile", "--flops", "--out", str(res)])
    r = json.loads(res.read_text())
    assert r["env"]["THP_MEM_ALLOC_ENABLE"] == THP
    assert set(r["minor_page_faults_per_step"]) == {"blindnet", "two_view_ce", "single_view"}
    assert all(len(v) == 1 and v[0] >= 0 for v in r["minor_page_faults_per_step"].values())
    by_op = r["fvcore_forward_flops"]["blindnet"]["by_operator"]
    # the one-pass covariance node is counted: Gram (B C^2 N) + diagonal (B C N) at 3 IN points
    # of ResNet-18 at crop 64 (64 ch at 32^2, 64 at 16^2, 128 at 8^2; 2 images)
    want = sum(2 * c * c * n + 2 * c * n for c, n in ((64, 32 * 32), (64, 16 * 16), (128, 8 * 8)))
    assert by_op["PythonOp._AugStats"] == want
    text = Path(r["profile"]).read_text()
    assert "blindseg/cml+ccl" in text and "blindseg/cwcl" in text and "where the difference goes" in text


def test_step_overhead_through_blindseg_train(tmp_path):
    res = tmp_path / "train.json"
    _run(["bench/step_overhead_train.py", "--backbone", "resnet18", "--crop", "64", "--rounds", "1", "--steps", "1",
          "--warmup", "1", "--threads", "1", "--names", "blindnet,two_view_ce", "--out", str(res)])
    r = json.loads(res.read_text())
    assert set(r["median_step_s"]) == {"blindnet", "two_view_ce"}
    assert all(len(v) == 1 and len(v[0]["step_s"]) == 1 for v in r["runs"].values())
    assert r["ratio_blindnet_vs_two_view_ce"] > 0 and r["env"]["THP_MEM_ALLOC_ENABLE"] == THP


def test_comm_profile_splits_the_global_scope_cost(tmp_path):
    res = tmp_path / "comm.json"
    _run(["bench/comm.py", "--worlds-bytes", "2", "--bytes-crop", "64", "--worlds-speed", "2", "--crop", "64",
          "--steps", "1", "--warmup", "0", "--profile", "--out", str(res)])
    r = json.loads(res.read_text())
    assert r["bytes"]["measured_received"]["2"] and r["step_time"]["by_processes"]["2"]["global_over_image"] > 0
    text = (tmp_path / "comm_profile_2.txt").read_text()
    assert "global - image" in text and "blindseg/cwcl" in text


def test_dg_effect_tiny_paired_rows_table_and_chart(tmp_path):
    res = tmp_path / "dg.json"
    out = _run(["bench/dg_effect.py", "--tiny", "--out", str(tmp_path / "w"), "--results", str(res)], timeout=1200)
    r = json.loads(res.read_text())
    s = r["setting"]
    assert s["tiny"] and s["seed_list"] == [304, 305] and s["unseen"] == ["synth_night", "synth_fog", "synth_rain",
                                                                         "synth_dusk", "synth_snow"]
    # one row per arm, seed and target; the arms share the seeds (paired)
    keys = {(row["arm"], row["seed"], row["target"]) for row in r["rows"]}
    assert len(keys) == len(r["rows"]) == 3 * 2 * 7  # source, 5 unseen domains, 1 corruption (tiny)
    assert {row["target"] for row in r["rows"] if row["group"] == "corruption"} == {"gaussian_noise-s3"}
    assert s["corruptions"] == ["gaussian_noise-s3"] and set(r["summary"]) == {"unseen", "corruption", "source"}
    assert {row["seed"] for row in r["rows"] if row["arm"] == "all four"} == {304, 305}
    u = r["summary"]["unseen"]
    for arm in ("two-view CE", "all four"):
        d = [u[arm]["per_seed"][k] - u["baseline"]["per_seed"][k] for k in u["baseline"]["per_seed"]]
        pg = u[arm]["paired_gain"]
        assert pg["n"] == 2 and abs(pg["gain"] - sum(d) / 2) < 1e-9
        assert abs(pg["se"] - abs(d[0] - d[1]) / 2) < 1e-9  # std(ddof=1) / sqrt(2) of two differences
    # the baseline ran without the second view and the extra losses; all four logged them
    losses = {run["arm"]: run["losses"] for run in r["runs"]}
    assert "loss/cwcl/last" in losses["all four"] and "loss/cwcl/last" not in losses["baseline"]
    assert "gain vs base" in out and Path(res.with_suffix(".png")).read_bytes()[:4] == b"\x89PNG"
    # the curve across settings (bench/dg_effect_curve.py): a second setting, here the same result as if
    # it had run 2 steps, adds its rows after the first; the gains are each setting's paired gains
    r2 = dict(r, setting={**s, "steps": 2})
    (tmp_path / "dg2.json").write_text(json.dumps(r2))
    _run(["bench/dg_effect_curve.py", str(tmp_path / "dg2.json"), str(res), "--out", str(tmp_path / "curve.json")])
    rows = json.loads((tmp_path / "curve.json").read_text())["rows"]
    arms = ["baseline", "two-view CE", "all four"]
    assert [(x["steps"], x["arm"]) for x in rows] == [(1, a) for a in arms] + [(2, a) for a in arms]
    assert abs(rows[2]["unseen_gain"] - u["all four"]["paired_gain"]["gain"]) < 1e-9 and rows[0]["unseen_gain"] is None
    over_two = [u["all four"]["per_seed"][k] - u["two-view CE"]["per_seed"][k] for k in u["baseline"]["per_seed"]]
    assert abs(rows[2]["unseen_over_two_view"] - sum(over_two) / 2) < 1e-9 and rows[1]["unseen_over_two_view"] is None
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_adapters_bench_counts_trained_state_and_activations(tmp_path):
    res = tmp_path / "adapters.json"
    out = _run(["bench/adapters.py", "--backbones", "dinov2_s", "--measure", "", "--out", str(res)])
    rows = {r["mode"]: r for r in json.loads(res.read_text())["rows"]}
    assert set(rows) == {"full", "frozen", "rein", "lora"} and "| dinov2_s | rein |" in out
    full, frozen = rows["full"], rows["frozen"]
    assert full["trained_params"] == full["total_params"] > frozen["trained_params"]
    for r in rows.values():  # AdamW: two fp32 moments per trained value; DDP reduces one fp32 gradient
        assert r["optimizer_state_bytes"] == 8 * r["trained_params"] == 2 * r["allreduce_bytes_per_step"]
    # the adapters' own parameters on top of the frozen encoder's trained neck and heads
    assert frozen["trained_params"] < rows["rein"]["trained_params"] < full["trained_params"]
    assert frozen["trained_params"] < rows["lora"]["trained_params"] < full["trained_params"]
    # no backward through a frozen encoder; adapters need it through every block, full fine-tuning most
    acts = {m: r["activation_bytes_512_per_view"] for m, r in rows.items()}
    assert acts["frozen"] < acts["lora"] < acts["full"] and acts["frozen"] < acts["rein"] < acts["full"]
    assert full["checkpoint_bytes"] > 2 * rows["rein"]["checkpoint_bytes"]


def test_startup_bench_measures_the_cli_and_the_config(tmp_path):
    res = tmp_path / "startup.json"
    out = _run(["bench/startup.py", "--repeats", "1", "--out", str(res)], timeout=300)
    r = json.loads(res.read_text())["results"]["this checkout"]
    assert r["config_loads_torch"] is False and r["library_lines"] > 1000 and r["library_files"] > 10
    assert r["min_help_s"] > 0 and 0 < r["median_config_importtime_us"] < 1e6 * r["median_config_s"]
    assert "| this checkout |" in out


def test_loss_grads_splits_the_objective_gradient_by_term(train_shards, tmp_path):
    """bench/loss_grads.py: the per-term gradients add up to the objective's (so its weights are the
    objective's), CML/CCL reach the encoder only, and the script writes its table and JSON."""
    import torch

    from bench import loss_grads as lg
    from blindseg_dist.config import load_config, model_kwargs
    from blindseg_dist.data.stream import train_loader_from_config
    from blindseg_dist.model import build_model
    from blindseg_dist.model.objective import BlindNetObjective

    sets = [f"data.train={train_shards}", "data.crop_size=32", "data.batch_size=2", "run.threads=1"]
    cfg = load_config("demo", [*sets, *lg.ALL_FOUR, "data.num_workers=0", "model.backbone=resnet18"])
    torch.manual_seed(0)
    net = build_model(**model_kwargs(cfg)).train()
    objective = BlindNetObjective(net, cfg.loss, run_seed=cfg.run.seed)
    enc = list(net.backbone.parameters())
    dec = [p for p in net.parameters() if all(p is not q for q in enc)]
    batch = next(iter(train_loader_from_config(cfg)))
    torch.manual_seed(1)  # dropout: the same draws in both forwards (the losses seed per image and step)
    res = lg.batch_gradients(objective, batch, 0, {"encoder": enc, "decoder": dec})
    assert set(res) == set(lg.TERMS)
    torch.manual_seed(1)
    total = objective(batch["image"], batch["label"], batch["image_aug"], step=0,
                      global_index=torch.arange(2))["total"]
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, enc)])
    got = sum(r["grad"]["encoder"] for r in res.values())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert abs(sum(r["value"] for r in res.values()) - float(total.detach())) < 1e-4 * abs(float(total.detach()))
    for name in ("cml", "ccl"):
        assert float(res[name]["grad"]["decoder"].abs().max()) == 0 and float(res[name]["grad"]["encoder"].norm()) > 0
    out = tmp_path / "lg.json"
    text = _run(["bench/loss_grads.py", "--set", *sets, "model.backbone=resnet18", "--batches", "2",
                 "--checkpoint", "init", "--label", "start", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["label"] == "start" and row["terms"]["seg"]["batches"] == 2
    assert abs(row["terms"]["seg"]["ratio_encoder"] - 1) < 1e-6 and "| start | cml |" in text
