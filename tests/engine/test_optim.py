"""Recipes (engine/optim.py, model/freeze.py): warm-up and decay values at given steps, layer-wise
lr decay, head lr multiplier, weight-decay exclusions, frozen parameters."""
from __future__ import annotations

import math

import pytest
import torch

from blindseg_dist.config import ConfigError, load_config
from blindseg_dist.engine.optim import build_optimizer, lr_lambda, param_groups
from blindseg_dist.model import build_model
from blindseg_dist.model.freeze import layer_ids

TINY_VIT = ["model.backbone=timm:vit_small_patch16_224", "model.timm_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
            "model.vit_pyramid_channels=16", "model.num_classes=5"]


def _cfg(*overrides: str):
    return load_config(None, [*TINY_VIT, *overrides])


def _lrs(opt) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_warmup_and_decay_values_at_given_steps(schedule: str) -> None:
    cfg = load_config(None, ["model.backbone=resnet18", "optim.max_steps=100", "optim.warmup_steps=10",
                             "optim.warmup_ratio=0.1", f"optim.schedule={schedule}", "optim.poly_power=0.9",
                             "optim.min_lr_ratio=0.01", "optim.lr=0.5"])
    net = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(cfg, net)

    def decay(t: float) -> float:
        f = (1 - t) ** 0.9 if schedule == "poly" else 0.5 * (1 + math.cos(math.pi * t))
        return 0.01 + 0.99 * f

    want = {0: 0.5 * decay(0) * 0.1, 5: 0.5 * decay(0.05) * (0.1 + 0.9 * 0.5), 10: 0.5 * decay(0.1),
            50: 0.5 * decay(0.5), 100: 0.5 * 0.01}
    for step in range(101):
        if step in want:
            assert opt.param_groups[0]["lr"] == pytest.approx(want[step], rel=1e-9), step
        opt.step()
        sched.step()
    # the warm-up rises monotonically to the decayed curve
    f = lr_lambda(cfg.optim)
    assert all(f(s) < f(s + 1) for s in range(10)) and f(10) > f(11)


def test_reference_recipe_is_one_sgd_group() -> None:
    cfg = load_config(None, ["model.backbone=resnet18"])
    net = build_model("resnet18", num_classes=5)
    opt, _ = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.01, 0.9, 5e-4)
    assert [id(p) for p in g["params"]] == [id(p) for p in net.parameters()]


def test_layer_decay_head_mult_and_no_weight_decay_on_a_vit() -> None:
    cfg = _cfg("optim.optimizer=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05", "optim.layer_decay=0.5",
               "optim.head_lr_mult=10", "optim.no_weight_decay=[norm, bias, pos_embed]", "optim.betas=[0.9, 0.95]")
    torch.manual_seed(0)
    net = build_model(**__import__("blindseg_dist.config", fromlist=["model_kwargs"]).model_kwargs(cfg))
    opt, _ = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(net.named_parameters())
    n = 5  # patch embedding + 4 blocks
    lr = lambda name: where[id(named[name])]["lr"]  # noqa: E731
    wd = lambda name: where[id(named[name])]["weight_decay"]  # noqa: E731
    assert lr("backbone.vit.patch_embed.proj.weight") == pytest.approx(1e-3 * 0.5 ** n)
    assert lr("backbone.vit.pos_embed") == pytest.approx(1e-3 * 0.5 ** n)
    for i in range(4):
        assert lr(f"backbone.vit.blocks.{i}.attn.qkv.weight") == pytest.approx(1e-3 * 0.5 ** (n - 1 - i))
    for head in ("decoder.classifier.weight", "aux_head.body.0.weight", "proj_heads.0.body.0.weight",
                 "backbone.levels.0.proj.0.weight"):
        assert lr(head) == pytest.approx(1e-2), head
    assert wd("backbone.vit.blocks.0.attn.qkv.weight") == 0.05 and wd("decoder.classifier.weight") == 0.05
    for name in ("backbone.vit.blocks.0.attn.qkv.bias", "backbone.vit.blocks.0.norm1.weight",
                 "backbone.vit.pos_embed", "backbone.vit.cls_token", "decoder.fuse.0.1.weight",
                 "backbone.levels.0.proj.1.weight"):
        assert wd(name) == 0.0, name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("timm:convnext_atto", 12),
                                          ("timm:swin_tiny_patch4_window7_224", 12)])
def test_layer_ids_of_cnn_and_swin_backbones(name: str, blocks: int) -> None:
    kw = {"output_stride": 32} if "swin" in name else {}
    net = build_model(name, num_classes=5, **kw)
    ids, n = layer_ids(net.backbone)
    assert n == blocks + 1 and set(ids.values()) <= set(range(n + 1))
    order = [ids[k] for k, _ in net.backbone.named_parameters()]
    assert order == sorted(order)  # ids grow with depth
    assert len(set(order)) == n  # every block has parameters of its own
    cfg = load_config(None, [f"model.backbone={name}", "optim.layer_decay=0.8"])
    groups = param_groups(cfg.optim, net)
    assert len(groups) == n + 1  # n encoder groups + the heads


def _step(cfg, net):
    obj = net
    opt, sched = build_optimizer(cfg, obj)
    x = torch.randn(2, 3, 32, 32)
    out = obj.train()(x)
    (out["logits"].square().mean() + out["aux"].square().mean()).backward()
    opt.step()
    sched.step()
    return opt


@pytest.mark.parametrize("freeze", ["model.freeze_backbone=true", "model.freeze_blocks=2"])
def test_frozen_parameters_untouched_and_without_optimizer_state(freeze: str) -> None:
    from blindseg_dist.config import model_kwargs

    cfg = _cfg(freeze, "optim.optimizer=adamw", "optim.lr=1e-2", "optim.weight_decay=0.1")
    torch.manual_seed(0)
    net = build_model(**model_kwargs(cfg))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = _step(cfg, net)
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    if "freeze_backbone" in freeze:
        assert frozen == {k for k in before if k.startswith("backbone.vit.")}
    else:
        assert frozen == {k for k in before if k.startswith(("backbone.vit.patch_embed", "backbone.vit.cls_token",
                                                             "backbone.vit.pos_embed", "backbone.vit.blocks.0.",
                                                             "backbone.vit.blocks.1."))}
    for k, p in net.named_parameters():
        if k in frozen:
            assert p.grad is None and torch.equal(p, before[k]), k
            assert p not in opt.state
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[k]), k
            assert "exp_avg" in opt.state[p]
    assert any(not torch.equal(p, before[k]) for k, p in net.named_parameters() if k.startswith("backbone.levels"))


def test_recipe_config_errors() -> None:
    for bad, match in (("optim.optimizer=lamb", "optim.optimizer"), ("optim.schedule=step", "optim.schedule"),
                       ("optim.no_weight_decay=[norms]", "optim.no_weight_decay"),
                       ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.layer_decay=1.5", "optim.layer_decay"),
                       ("optim.betas=[0.9]", "optim.betas"), ("model.vit_in_points=[embed, p4]", "model.vit_in_points"),
                       ("model.proj_levels=[high, dec0, foo]", "model.proj_levels"),
                       ("model.vit_blocks=[1, 2]", "model.vit_blocks")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="freeze_blocks"):
        load_config(None, ["model.freeze_backbone=true", "model.freeze_blocks=2"])


def _ddp_reduced_elements(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from blindseg_dist.config import model_kwargs

    cfg = _cfg("model.freeze_blocks=2")
    torch.manual_seed(0)
    net = build_model(**model_kwargs(cfg)).train()
    ddp = DDP(net)
    reduced = []

    def hook(state, bucket):
        reduced.append(bucket.buffer().numel())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    ddp.register_comm_hook(None, hook)
    torch.manual_seed(rank)
    out = ddp(torch.randn(2, 3, 32, 32))
    # every trainable parameter takes part (a bucket is reduced once all its gradients are ready)
    loss = out["logits"].square().mean() + out["aux"].square().mean() + sum(e.mean() for e in out["embeds"])
    loss = loss + sum(t.square().mean() for t in out["in_feats"])  # CML/CCL read them
    loss.backward()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = [p.grad is None for p in net.parameters() if not p.requires_grad]
    return {"world": dist.get_world_size(), "reduced": sum(reduced), "trainable": trainable,
            "total": sum(p.numel() for p in net.parameters()), "frozen_without_grad": all(frozen) and bool(frozen)}


def test_frozen_parameters_are_not_all_reduced_under_ddp() -> None:
    from blindseg_dist.launcher import run_gloo

    results = run_gloo(_ddp_reduced_elements, 2)
    for r in results:
        assert r["world"] == 2 and r["frozen_without_grad"]
        assert r["reduced"] == r["trainable"] < r["total"]  # DDP buckets hold the trainable gradients only
