"""Helpers of the evaluation / tools tests: tiny synthetic shards and an untrained checkpoint
(imported as tests.engine._eval_fixtures by the engine and tools tests)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def make_shards(root: Path, images: int = 6, size=(64, 128)) -> dict[str, Path]:
    """Synthetic GTA5-layout source shards ("train") and Cityscapes-layout night shards ("night")."""
    from blindseg_dist.data.shards import write_shards
    from blindseg_dist.data.sources import get_source
    from blindseg_dist.data.synth import generate

    root = Path(root)
    generate(root / "synth", domains=2, images_per_domain=images, size=size, seed=0, progress=False)
    out = {"train": root / "shards" / "train", "night": root / "shards" / "night"}
    write_shards(get_source("gta5", root / "synth" / "gta5", split="all"), out["train"], samples_per_shard=2,
                 progress=False)
    write_shards(get_source("cityscapes", root / "synth" / "synth_night", split="val"), out["night"],
                 samples_per_shard=2, progress=False)
    return out


def make_checkpoint(run_dir: Path, overrides: list[str] | None = None, seed: int = 0) -> Path:
    """An untrained demo-config (ResNet-18) network saved as RUN/checkpoints/1 with RUN/config.yaml."""
    from blindseg_dist.config import load_config, model_kwargs, save_config, to_dict
    from blindseg_dist.engine.checkpoint import save_checkpoint
    from blindseg_dist.model import build_model

    cfg = load_config(DEMO_CONFIG, [f"run.output_dir={run_dir}", *(overrides or [])])
    save_config(cfg, Path(run_dir) / "config.yaml")
    torch.manual_seed(seed)
    net = build_model(**model_kwargs(cfg))
    return save_checkpoint(run_dir, 1, model_state=net.state_dict(), state={},
                           config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False))
