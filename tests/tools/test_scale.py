"""`blindseg scale` end to end at a tiny size: two backbones (ResNet-18, a small ViT) x 1 seed on
synthetic shards, each trained and evaluated in its own process; a table, csv and plot of
unseen-domain mIoU against parameters and GFLOPs with images/s and peak memory; a rerun skips both."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blindseg_dist.config import ConfigError, load_config, model_kwargs
from blindseg_dist.model import build_model, count_parameters
from blindseg_dist.tools.scale import plan_scaling
from tests.engine._eval_fixtures import DEMO_CONFIG, make_shards


def _configs(tmp: Path) -> list[Path]:
    a = tmp / "r18.yaml"
    a.write_text(f"_base_: {DEMO_CONFIG}\nmodel:\n  backbone: resnet18\n")
    b = tmp / "vit_tiny.yaml"
    b.write_text(f"_base_: {DEMO_CONFIG}\nmodel:\n  backbone: timm:vit_small_patch16_224\n"
                 "  timm_kwargs: {depth: 2, embed_dim: 32, num_heads: 2}\n  vit_pyramid_channels: 16\n"
                 "optim:\n  optimizer: adamw\n  lr: 1.0e-3\n  layer_decay: 0.8\n  warmup_steps: 1\n")
    return [a, b]


def _scale(out: Path, configs, shards, env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blindseg_dist", "scale", "--configs", *map(str, configs), "--seeds", "1",
           "--output-dir", str(out), "--flops-size", "64x128", f"data.train={shards['train']}", "data.crop_size=32",
           "data.batch_size=2", "data.num_workers=0", "optim.max_steps=2", "run.log_every=1",
           f"eval.targets={{night: {shards['night']}}}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_scale_two_backbones_end_to_end_and_resume(tmp_path):
    shards = make_shards(tmp_path / "data", images=4)
    configs = _configs(tmp_path)
    out = tmp_path / "scale"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = _scale(out, configs, shards, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("training ... done") == 2
    rows = {r["backbone"]: r for r in csv.DictReader((out / "scaling.csv").open())}
    assert set(rows) == {"r18", "vit_tiny"}
    for name, config in zip(("r18", "vit_tiny"), configs):
        run_dir = out / "runs" / name / "seed0"
        miou = json.loads((run_dir / "eval.json").read_text())["targets"]["night"]["miou"]
        r = rows[name]
        assert float(r["unseen_miou"]) == pytest.approx(miou)  # night: an unseen domain (source: gta5)
        assert r["seeds"] == "1" and float(r["images_per_s"]) > 0 and float(r["peak_rss_mib"]) > 100
        cfg = load_config(config)
        assert float(r["params_m"]) * 1e6 == pytest.approx(count_parameters(build_model(**model_kwargs(cfg)))["inference"])
        assert float(r["gflops"]) > 0
        summ = json.loads((run_dir / "summary.json").read_text())
        assert float(r["trained_params_m"]) * 1e6 == pytest.approx(summ["trainable_params"])
        assert float(r["total_params_m"]) * 1e6 == pytest.approx(summ["total_params"])
        assert float(r["checkpoint_mb"]) == pytest.approx(
            sum(f.stat().st_size for f in Path(summ["checkpoint"]).rglob("*") if f.is_file()) / 2**20)
    assert rows["r18"]["model"] == "resnet18" and rows["vit_tiny"]["model"] == "timm:vit_small_patch16_224"
    md = (out / "scaling.md").read_text()
    assert "| r18 |" in md and "| vit_tiny |" in md and "night" in md
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _scale(out, configs, shards, env)
    assert again.returncode == 0 and again.stdout.count("skipped (eval.json exists)") == 2, again.stdout[-2000:]
    assert {r["backbone"]: r["unseen_miou"] for r in csv.DictReader((out / "scaling.csv").open())} == \
        {k: v["unseen_miou"] for k, v in rows.items()}


def test_scale_plan_errors(tmp_path):
    configs = _configs(tmp_path)
    with pytest.raises(ConfigError, match="eval.targets"):
        plan_scaling([str(c) for c in configs], 1, tmp_path)
    with pytest.raises(ConfigError, match="seeds"):
        plan_scaling([str(configs[0])], 0, tmp_path)
    with pytest.raises(ConfigError, match="run.seed"):
        plan_scaling([str(configs[0])], 1, tmp_path, ["run.seed=3", "eval.targets={a: /x}"])
    with pytest.raises(ConfigError, match="share the folder"):
        plan_scaling([str(configs[0]), str(configs[0])], 1, tmp_path, ["eval.targets={a: /x}"])
    entries, plan, _ = plan_scaling(["scaling/resnet50", "scaling/vit_small"], 2, tmp_path, ["eval.targets={a: /x}"])
    assert [e.slug for e in entries] == ["resnet50", "vit_small"] and len(plan) == 4
    assert [r.seed for r in plan] == [304, 305, 304, 305] and plan[3].config.endswith("vit_small.yaml")
