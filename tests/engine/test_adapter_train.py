"""`blindseg train` with model.adapter=rein / lora on DINOv2-S (CPU, 2 steps, crop 56, BlindNet's four
losses): the frozen encoder is bitwise unchanged, only adapter, neck and head parameters get optimizer
state, summary.json counts trained and total parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blindseg_dist.config import load_config, model_kwargs
from blindseg_dist.model import build_model
from tests.engine._engine_runs import PY, env, run, summary, tail

ARCH = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> Path:
    """A DINOv2-S state dict (random weights, timm names), as a local pretrained file."""
    import timm

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "dinov2_s.pth"
    torch.save(timm.create_model(ARCH, pretrained=False, num_classes=0).state_dict(), path)
    return path


def train_adapter(out: Path, shards: Path, weights: Path, adapter: str, *extra: str):
    cmd = [PY, "-m", "blindseg_dist", "train", "--config", "demo", "--output-dir", str(out), "--max-steps", "2",
           f"data.train={shards}", "data.crop_size=56", "data.batch_size=2", "data.num_workers=0",
           "run.log_every=1", "run.threads=2", "eval.at_end=false", "run.checkpoint_every=100000",
           f"model.backbone=timm:{ARCH}", f"model.pretrained={weights}", f"model.adapter={adapter}",
           "optim.optimizer=adamw", "optim.lr=1e-3", "model.drop_path=0.2", *extra]
    return run(cmd, env(), timeout=600)


@pytest.mark.parametrize("adapter,extra", [("rein", ()), ("lora", ("model.lora_blocks=[4,11]", "model.lora_rank=4"))])
def test_adapter_trains_blindnet_with_the_encoder_frozen(train_shards, dinov2_file, tmp_path, adapter, extra):
    out = tmp_path / adapter
    res = train_adapter(out, train_shards, dinov2_file, adapter, *extra)
    assert res.returncode == 0, tail(res)
    s = summary(out)
    assert s["steps"] == 2 and s["stop_reason"] == "finished"
    cfg = load_config(out / "config.yaml")
    torch.manual_seed(cfg.run.seed)
    net = build_model(**model_kwargs(cfg))  # as the trainer built it (pretrained file + adapter)
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert s["trainable_params"] == sum(p.numel() for p in trained.values())
    assert s["total_params"] == sum(p.numel() for p in net.parameters()) > 20e6
    assert s["trainable_params"] < s["total_params"] / 2
    enc = [n for n in trained if n.startswith("backbone.vit.")]
    if adapter == "rein":
        assert enc == [] and any(n.startswith("backbone.rein.") for n in trained)
    else:
        assert enc and all(".lora_" in n for n in enc) and not any(".blocks.3." in n for n in enc)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    weights = load_file(str(ckpt / "model.safetensors"))
    file_state = torch.load(dinov2_file, weights_only=True)
    # every frozen encoder tensor is bitwise the pretrained one after 2 AdamW steps (weight decay included)
    frozen = [n for n, p in net.named_parameters() if n.startswith("backbone.vit.") and not p.requires_grad]
    assert len(frozen) > 100
    for n, p in net.named_parameters():
        if n in frozen and n in weights:
            assert torch.equal(weights[n], p.detach()), n
            key = n[len("backbone.vit."):].replace("base_layer.", "")
            assert torch.equal(weights[n], file_state[key]), n  # (peft's default init leaves W alone)
    # the adapters did train
    moved = [n for n in trained if n in weights and not torch.equal(weights[n], trained[n].detach())]
    assert any(n.startswith("backbone.rein." if adapter == "rein" else "backbone.vit.") for n in moved), moved[:5]
    # optimizer state: exactly the trained tensors (AdamW: exp_avg of each, same shapes)
    state = torch.load(ckpt / "state.pt", weights_only=False)["optimizer"]
    held = [v["exp_avg"].numel() for v in state["state"].values()]
    n_params = sum(len(g["params"]) for g in state["param_groups"])
    assert n_params == len(trained) and sum(held) == s["trainable_params"]


def test_adapter_checkpoint_holds_trained_tensors_and_round_trips(train_shards, dinov2_file, tmp_path):
    """A rein run's checkpoint: trained tensors + the backbone file's path and sha256; resume, eval's and
    predict's network rebuild, export; another backbone file is refused."""
    from PIL import Image

    from blindseg_dist.config import ConfigError
    from blindseg_dist.engine import checkpoint as ckpt
    from blindseg_dist.tools.evaluate_cli import load_checkpoint_model
    from blindseg_dist.tools.predict import predict_folder

    out = tmp_path / "run"
    res = train_adapter(out, train_shards, dinov2_file, "rein", "model.rein_tokens=10")
    assert res.returncode == 0, tail(res)
    step2 = out / "checkpoints" / "2"
    assert "MB (trained tensors only; frozen backbone" in res.stdout
    weights = load_file(str(step2 / "model.safetensors"))
    assert not any(k.startswith("backbone.vit.") for k in weights)
    assert any(k.startswith("backbone.rein.") for k in weights) and any(k.startswith("decoder.") for k in weights)
    file_state = torch.load(dinov2_file, weights_only=True)
    meta = ckpt.weights_metadata(step2)
    assert meta[ckpt.FROZEN_SHA_KEY] == ckpt.file_sha256(dinov2_file)
    assert Path(meta[ckpt.FROZEN_FILE_KEY]) == dinov2_file.resolve()
    full = sum(v.numel() * v.element_size() for v in file_state.values())
    assert (step2 / "model.safetensors").stat().st_size < full  # the whole network would be ~full + this file
    # eval / predict rebuild: the frozen backbone from the file, the rest from the checkpoint
    cfg, net = load_checkpoint_model(step2)
    state = net.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(state["backbone.vit.blocks.3.attn.qkv.weight"], file_state["blocks.3.attn.qkv.weight"])
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (60, 40), (90, 120, 30)).save(images / "a.png")
    pred = predict_folder(step2, images, tmp_path / "pred", progress=False)
    assert not pred["skipped"] and any((tmp_path / "pred").rglob("*.png"))
    # resume continues from the trained tensors (the same backbone file)
    res = train_adapter(out, train_shards, dinov2_file, "rein", "model.rein_tokens=10", "--resume", "--max-steps", "3",
                        "--allow-changed", "optim.max_steps")
    assert res.returncode == 0, tail(res)
    assert "resumed from" in res.stdout and summary(out)["steps"] == 3
    # another backbone file: a clear error on resume and on rebuild
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if k == "blocks.0.attn.qkv.bias" else v for k, v in file_state.items()}, other)
    with pytest.raises(ConfigError, match="a different backbone file"):
        ckpt.frozen_source(step2, other)
    res = train_adapter(out, train_shards, other, "rein", "model.rein_tokens=10", "--resume", "--max-steps", "4",
                        "--allow-changed", "optim.max_steps")
    assert res.returncode == 2 and "a different backbone file" in res.stderr, tail(res)
    moved = dinov2_file.with_name("moved.pth")
    dinov2_file.rename(moved)
    try:
        with pytest.raises(ConfigError, match="not at"):
            load_checkpoint_model(step2)
    finally:
        moved.rename(dinov2_file)
