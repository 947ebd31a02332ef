"""run.compile: the network compiled in place (model/compiled.py) trains through `blindseg train`.

The training run uses the aot_eager backend: the same graph capture (dynamo) and autograd tracing
(AOTAutograd) as inductor, without inductor's C++ code generation, which takes minutes on a CPU;
bench/compile_step.py measures inductor itself."""
from __future__ import annotations

import math

import torch

from blindseg_dist.config import CHOICES
from blindseg_dist.engine import records
from blindseg_dist.model import build_model
from blindseg_dist.model.compiled import BACKENDS, compile_network
from tests.engine._engine_runs import PY, ROOT, TINY, env, run, summary, tail


def test_backends_are_the_config_choices():
    assert tuple(CHOICES["run.compile_backend"]) == BACKENDS


def test_compiled_network_keeps_its_parameters_and_values():
    torch.manual_seed(0)
    net = build_model("resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    keys = list(net.state_dict())
    with torch.no_grad():
        want = net(x)
        rows = torch.randn(7, net.proj_heads[0].body[0].in_channels)
        want_rows = net.embed_rows(0, rows)
    compile_network(net, "eager")
    assert list(net.state_dict()) == keys  # checkpoints and DDP see the same module
    with torch.no_grad():
        torch.testing.assert_close(net(x), want)
        torch.testing.assert_close(net.embed_rows(0, rows), want_rows)
        torch.testing.assert_close(net.embed_rows(0, rows[:5]), want_rows[:5])  # dynamic row count


def test_run_compile_trains_two_steps(train_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "-m", "blindseg_dist", "train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(out),
           "--max-steps", "2", f"data.train={train_shards}", *TINY, "run.compile=true",
           "run.compile_backend=aot_eager"]
    res = run(cmd, env(), timeout=600)
    assert res.returncode == 0, tail(res)
    assert summary(out)["steps"] == 2
    metrics = records.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss/total"]) and m["loss/cwcl"] > 0 for m in metrics)
