"""DeepSpeed ZeRO 0/2/3 through Accelerate's plugin with the same training code (2 CPU processes).

The test DeepSpeed configs are the shipped launch/deepspeed/zero*.json with bf16 off (bf16 is ~40x
slower than fp32 on this CPU) and overlap_comm off; the trainer fills their "auto" values. Each
ZeRO stage must train exactly like DDP (same losses: SGD in fp32), let our poly schedule drive the
engine's optimizer, and save full (gathered) weights.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.engine._engine_runs import ROOT, env, run, summary, tail, train_cmd


@pytest.fixture(scope="module")
def ddp_reference(train_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    res = run(train_cmd(out, train_shards, 2), env())
    assert res.returncode == 0, tail(res)
    return out


def ds_launch_config(tmp, stage: int, *, bf16: bool = False):
    conf = json.loads((ROOT / f"launch/deepspeed/zero{max(stage, 1)}.json").read_text())
    conf["bf16"] = {"enabled": bf16}
    conf["zero_optimization"]["stage"] = stage
    conf["zero_optimization"]["overlap_comm"] = False
    (tmp / f"zero{stage}.json").write_text(json.dumps(conf))
    yaml = (ROOT / f"launch/accelerate/deepspeed_zero{max(stage, 1)}.yaml").read_text()
    yaml = yaml.replace(f"launch/deepspeed/zero{max(stage, 1)}.json", str(tmp / f"zero{stage}.json"))
    yaml = yaml.replace("num_processes: 8", "num_processes: 2")
    (tmp / f"zero{stage}.yaml").write_text(yaml)
    return tmp / f"zero{stage}.yaml"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_trains_like_ddp_and_saves_full_weights(stage, train_shards, ddp_reference, tmp_path):
    out = tmp_path / "run"
    res = run(train_cmd(out, train_shards, 2, config_file=ds_launch_config(tmp_path, stage)), env(cpu=False))
    assert res.returncode == 0, tail(res)
    assert "built successfully" not in res.stdout + res.stderr  # the shared-memory op was not compiled
    s, ref = summary(out), summary(ddp_reference)
    assert s["engine"] == f"deepspeed_zero{stage}" and s["steps"] == 2
    assert s["lr"] == 0.0  # our poly schedule reached the engine's optimizer (0.01 -> 0 at max_steps)
    assert math.isclose(s["last_loss"], ref["last_loss"], rel_tol=1e-4), (s["last_loss"], ref["last_loss"])
    ckpt = out / "checkpoints" / "2"
    assert (ckpt / "deepspeed" / "engine").is_dir()  # every rank's optimizer partition
    w, w_ref = load_file(str(ckpt / "model.safetensors")), load_file(str(ddp_reference / "checkpoints/2/model.safetensors"))
    assert w.keys() == w_ref.keys()
    for k, v in w.items():  # full shapes (gathered under ZeRO-3), finite, and the same training
        assert v.shape == w_ref[k].shape, k
        assert torch.isfinite(v.float()).all(), k
        # ZeRO-3 reduce-scatters gradients in another summation order: float tolerance, not bitwise
        torch.testing.assert_close(v.float(), w_ref[k].float(), rtol=1e-2, atol=1e-3, msg=k)


def test_precision_mismatch_is_a_clear_config_error(train_shards, tmp_path):
    # the shipped ZeRO-2 config trains in bf16; the run asks for fp32
    yaml = (ROOT / "launch/accelerate/deepspeed_zero2.yaml").read_text().replace("num_processes: 8", "num_processes: 2")
    (tmp_path / "z2.yaml").write_text(yaml)
    res = run(train_cmd(tmp_path / "run", train_shards, 2, "run.mixed_precision=no", config_file=tmp_path / "z2.yaml"),
              env(cpu=False), timeout=120)
    assert res.returncode != 0
    assert "run.mixed_precision" in res.stderr and "'bf16'" in res.stderr, tail(res)


def test_shipped_deepspeed_configs_are_explicit_bf16_and_referenced():
    for stage in (1, 2, 3):
        conf = json.loads((ROOT / f"launch/deepspeed/zero{stage}.json").read_text())
        assert conf["bf16"]["enabled"] is True and conf["zero_optimization"]["stage"] == stage
        zero = conf["zero_optimization"]
        buckets = [k for k in zero if "bucket_size" in k or "threshold" in k]
        assert buckets and all(isinstance(zero[k], int) for k in buckets)  # no "auto" bucket sizes
        assert "optimizer" not in conf and "scheduler" not in conf
        yaml = (ROOT / f"launch/accelerate/deepspeed_zero{stage}.yaml").read_text()
        assert f"launch/deepspeed/zero{stage}.json" in yaml and "distributed_type: DEEPSPEED" in yaml
