"""optim.ema_decay: checkpoints hold the EMA of the trained weights (state.pt the live ones), the EMA
follows its formula, and a resume restores both exactly (ResNet-18, CPU, 1 process, crop 64)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from blindseg_dist.config import load_config, model_kwargs
from blindseg_dist.model import build_model
from tests.engine._engine_runs import PY, env, run, tail

DECAY = 0.75


def _train(out, shards, steps, *extra, code=0, **fault):
    cmd = [PY, "-m", "blindseg_dist", "train", "--config", "demo", "--output-dir", str(out), "--max-steps", str(steps),
           f"data.train={shards}", "data.crop_size=64", "data.batch_size=2", "data.num_workers=0", "run.threads=1",
           "eval.at_end=false", "run.checkpoint_every=1", "run.keep_last=5", f"optim.ema_decay={DECAY}",
           "optim.ema_start=1", *extra]
    res = run(cmd, env(**fault), timeout=400)
    assert res.returncode == code, tail(res)
    return res


def test_ema_checkpoints_and_exact_resume(train_shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _train(full, train_shards, 3)
    _train(part, train_shards, 3, code=17, BLINDSEG_FAULT_EXIT="2")  # dies after checkpoint 2 (same schedule)
    assert not (part / "checkpoints" / "3").exists()
    _train(part, train_shards, 3, "--resume")
    live = {s: torch.load(full / "checkpoints" / str(s) / "state.pt", weights_only=False)["ema_live"] for s in (1, 2, 3)}
    ema = {s: load_file(str(full / "checkpoints" / str(s) / "model.safetensors")) for s in (1, 2, 3)}
    cfg = load_config(full / "config.yaml")
    torch.manual_seed(cfg.run.seed)
    trained = {n for n, p in build_model(**model_kwargs(cfg)).named_parameters() if p.requires_grad}
    assert set(live[1]) == trained
    # step 1 <= ema_start: a copy; then ema_s = d ema_{s-1} + (1 - d) live_s
    for n in trained:
        assert torch.equal(ema[1][n], live[1][n]), n
        for s in (2, 3):
            torch.testing.assert_close(ema[s][n], DECAY * ema[s - 1][n] + (1 - DECAY) * live[s][n],
                                       rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ema[3][n], live[3][n]) for n in trained)
    # buffers (BN running statistics) are the live ones
    assert any(k.endswith("running_mean") for k in ema[3])
    # the resumed run ends exactly where the uninterrupted one does: EMA and live weights
    resumed = load_file(str(part / "checkpoints" / "3" / "model.safetensors"))
    resumed_live = torch.load(part / "checkpoints" / "3" / "state.pt", weights_only=False)["ema_live"]
    for k, v in ema[3].items():
        assert torch.equal(resumed[k], v), k
    for k, v in live[3].items():
        assert torch.equal(resumed_live[k], v), k
