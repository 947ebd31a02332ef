"""Every configs/scaling/*.yaml loads (through its `_base_` chain), validates and builds its network
(construction only); each family carries its community's recipe; a DINOv2-L BlindNet config trains
2 steps on the CPU at a small crop with per-block activation checkpointing."""
from pathlib import Path

import pytest

from blindseg_dist.config import ConfigError, load_config, model_kwargs, read_config_tree
from blindseg_dist.model import build_model, count_parameters
from tests.engine._engine_runs import PY, env, run, summary, tail

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(c for c in (ROOT / "configs" / "scaling").glob("*.yaml") if not c.name.startswith("_"))


def test_scaling_configs_cover_the_backbone_families():
    names = {c.stem for c in CONFIGS}
    assert {"resnet50", "resnet101", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
            "swin_tiny", "swin_small", "swin_base", "vit_small", "vit_base", "vit_large", "dinov2_small",
            "dinov2_base", "dinov2_large", "dinov2_large_reg4", "dinov2_large_frozen", "eva02_small",
            "eva02_base", "eva02_large"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_scaling_config_builds(config):
    cfg = load_config(config)
    assert len(config.read_text().splitlines()) <= 12  # a few lines on top of the shared base
    net = build_model(**model_kwargs(cfg))
    counts = count_parameters(net)
    assert counts["inference"] > 1e6 and counts["proj_heads"] > 0
    family = next(f for f in ("resnet", "convnext", "swin", "vit", "dinov2", "eva02") if config.stem.startswith(f))
    want = {"resnet": ("sgd", 1.0), "convnext": ("adamw", 0.9), "swin": ("adamw", 1.0), "vit": ("adamw", 0.65),
            "dinov2": ("adamw", 0.9), "eva02": ("adamw", 0.9)}[family]
    assert cfg.optim.optimizer == want[0]
    if config.stem != "vit_large":
        assert cfg.optim.layer_decay == want[1]
    if family != "resnet":
        assert cfg.optim.warmup_steps > 0 and cfg.optim.no_weight_decay
    if family == "swin":
        assert cfg.model.output_stride == 32
    if config.stem == "dinov2_large_frozen":
        assert not any(p.requires_grad for p in net.backbone.vit.parameters())


def test_base_chain_merges_sections_and_refuses_cycles(tmp_path):
    tree = read_config_tree(ROOT / "configs/scaling/vit_large.yaml")
    assert tree["optim"]["layer_decay"] == 0.8 and tree["optim"]["lr"] == 1e-4  # own key over the family's
    assert tree["model"]["output_stride"] == 16 and "_base_" not in tree  # from the shared base
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\noptim: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: [scaling/_base, missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")


def test_dinov2_large_trains_two_steps_on_the_cpu_with_checkpointing(train_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "-m", "blindseg_dist", "train", "--config", "scaling/dinov2_large", "--output-dir", str(out),
           "--max-steps", "2", f"data.train={train_shards}", "data.crop_size=56", "data.batch_size=2",
           "data.num_workers=0", "run.log_every=1", "run.threads=2", "eval.at_end=false", "run.mixed_precision=no",
           "run.checkpoint_every=100000"]  # warm-up 1500 steps: 2 steps train at a tiny lr, still every parameter
    res = run(cmd, env(), timeout=600)
    assert res.returncode == 0, tail(res)
    s = summary(out)
    assert s["steps"] == 2 and s["stop_reason"] == "finished" and s["last_loss"] == s["last_loss"]
    assert "304." in res.stdout or "M parameters" in res.stdout
    cfg = load_config(out / "config.yaml")
    assert cfg.model.backbone == "timm:vit_large_patch14_dinov2" and cfg.model.grad_checkpointing
