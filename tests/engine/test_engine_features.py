"""Training features end to end in one CPU process: gradient accumulation, clipping, channels_last,
activation checkpointing, bf16 autocast; fp16 on the CPU is refused with a clear message."""
import json
import math

import torch

from blindseg_dist import cli
from blindseg_dist.engine import checkpoint as ckpt
from tests.engine._engine_runs import PY, ROOT, TINY, env, run, summary, tail


def one_process(out, train_shards, steps, *overrides):
    return [PY, "-m", "blindseg_dist", "train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(out),
            "--max-steps", str(steps), f"data.train={train_shards}", *TINY, *overrides]


def test_accumulation_clipping_channels_last_checkpointing(train_shards, tmp_path):
    out = tmp_path / "run"
    res = run(one_process(out, train_shards, 2, "optim.grad_accum=2", "optim.grad_clip=1.0", "model.channels_last=true",
                          "model.grad_checkpointing=true", "run.record_stream=true", "run.image_every=1"), env())
    assert res.returncode == 0, tail(res)
    s = summary(out)
    assert s["steps"] == 2 and s["stop_reason"] == "finished" and math.isfinite(s["last_loss"])
    assert "global batch 4" in res.stdout  # 2 images x 2 micro-batches x 1 process
    record = json.loads((out / "streamed-rank0.json").read_text())
    assert [len(b) for b in record["keys"]] == [2, 2, 2, 2]  # exactly steps x grad_accum micro-batches
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    assert len(events.Images(events.Tags()["images"][0])) == 2  # run.image_every=1: a panel per step
    w = ckpt.load_model_weights(out / "checkpoints" / "2")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_bf16_autocast_trains_and_keeps_float32_weights(train_shards, tmp_path):
    out = tmp_path / "run"
    res = run(one_process(out, train_shards, 1, "run.mixed_precision=bf16", "data.crop_size=32"), env())
    assert res.returncode == 0, tail(res)
    assert "precision bf16" in res.stdout and math.isfinite(summary(out)["last_loss"])
    w = ckpt.load_model_weights(out / "checkpoints" / "1")
    assert all(v.dtype != torch.bfloat16 for v in w.values())
    assert all(torch.isfinite(v).all() for v in w.values())


def test_fp16_on_cpu_is_refused_clearly(train_shards, tmp_path, capsys):
    rc = cli.main(["train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(tmp_path / "run"),
                   f"data.train={train_shards}", "run.mixed_precision=fp16"])
    err = capsys.readouterr().err
    assert rc == 2 and "run.mixed_precision" in err and "needs a GPU" in err, err
