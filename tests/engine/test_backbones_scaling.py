"""Every configs/scaling/*.yaml loads, validates and builds its network (construction only)."""
from pathlib import Path

import pytest

from blindseg_dist.config import load_config, model_kwargs
from blindseg_dist.model import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "scaling").glob("*.yaml"))


def test_scaling_configs_cover_the_backbone_families():
    names = {c.stem for c in CONFIGS}
    assert {"resnet50", "resnet101", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
            "swin_tiny", "swin_small", "swin_base"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_scaling_config_builds(config):
    cfg = load_config(config)
    net = build_model(**model_kwargs(cfg))
    counts = count_parameters(net)
    assert counts["inference"] > 1e6 and counts["proj_heads"] > 0
    if "swin" in config.stem:
        assert cfg.model.output_stride == 32
