"""A BlindNet step with a ViT adapter (rein, lora) on a frozen encoder under DDP equals one process on the
concatenated batch, on real gloo processes (the pattern of test_train_step_ddp.py, smaller).

Tiny DINOv2 (depth 2, width 32), crop 56, float64, global batch 4 (W=2: 2+2, W=3: 2+1+1), every
BlindNet loss on: CML/CCL at the ViT IN points (embed, p4, p8), CWCL/SDCL at the projection levels,
covariance scope "batch", contrastive scope "global", CE "exact". Per rank: DistributedDataParallel
with its default find_unused_parameters=False; checked:
  a. the mean over ranks of the loss and of every term == the 1-process values (rtol 1e-6);
  b. the DDP-averaged gradient of every trained parameter == the 1-process gradient (rtol 1e-6);
  c. DDP's reducer holds exactly the trained parameters (adapters, pyramid, decoder, heads: no frozen
     encoder tensor in its buckets), the frozen ones get no gradient;
  d. a second step runs (DDP without find_unused_parameters raises there when a trained parameter got
     no gradient in the first).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from blindseg_dist.launcher import run_gloo
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights
from blindseg_dist.model.syncbn import convert_sync_batchnorm

SPLITS = {2: [2, 2], 3: [2, 1, 1]}
RUN_SEED, STEP, CROP = 304, 5, 56
RTOL = 1e-6
WEIGHTS = LossWeights(ce_scope="exact", covariance_scope="batch", contrastive_scope="global")
ADAPTERS = {
    "rein": dict(adapter="rein", rein=dict(num_tokens=8, rank=4)),
    "lora": dict(adapter="lora", lora=dict(rank=4, blocks=[1, 1], init="svd_minor", train_bias=True)),
}


def make_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = build_model("timm:vit_small_patch14_dinov2", timm_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
                      vit=dict(pyramid_channels=16, **ADAPTERS[name]), proj_dim=16).double()
    for m in net.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0  # a per-rank dropout mask cannot match the 1-process one
    return net.train()


@functools.cache
def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, CROP, CROP, generator=g, dtype=torch.float64)
    image_aug = 0.6 * image + 0.8 * torch.randn(image.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pred = make_net("rein")(image)["logits"].argmax(1)
    label = torch.where(torch.rand(pred.shape, generator=g) < 0.2, torch.randint(0, 19, pred.shape, generator=g), pred)
    label[0, :6] = 255
    return {"image": image, "image_aug": image_aug, "label": label}


def _step(obj, batch, lo, hi, step=STEP):
    out = obj(batch["image"][lo:hi], batch["label"][lo:hi], batch["image_aug"][lo:hi], step=step,
              global_index=torch.arange(lo, hi))
    out["total"].backward()
    return float(out["total"].detach()), {k: float(v.detach()) for k, v in out["terms"].items()}


@functools.cache
def _reference(name: str) -> dict:
    obj = BlindNetObjective(make_net(name), WEIGHTS, run_seed=RUN_SEED).train()
    total, terms = _step(obj, make_batch(), 0, 4)
    grads = {n: p.grad.detach().clone() for n, p in obj.named_parameters() if p.grad is not None}
    return {"total": total, "terms": terms, "grads": grads,
            "trained": sorted(n for n, p in obj.named_parameters() if p.requires_grad)}


def _worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    out = {}
    for name in ADAPTERS:
        obj = BlindNetObjective(convert_sync_batchnorm(make_net(name)), WEIGHTS, run_seed=RUN_SEED).train()
        ddp = DDP(obj)  # find_unused_parameters=False (the default)
        reducer = {id(p) for p in ddp._build_params_for_reducer()[0]}
        in_reducer = sorted(n for n, p in obj.named_parameters() if id(p) in reducer)
        total, terms = _step(ddp, make_batch(), lo, hi)
        grads = {n: p.grad.detach().clone().numpy() for n, p in obj.named_parameters() if p.grad is not None}
        frozen_with_grad = [n for n, p in obj.named_parameters() if not p.requires_grad and p.grad is not None]
        obj.zero_grad(set_to_none=True)
        second, _ = _step(ddp, make_batch(), lo, hi, step=STEP + 1)  # raises if step 1 left a parameter unused
        out[name] = {"total": total, "terms": terms, "grads": grads, "in_reducer": in_reducer,
                     "frozen_with_grad": frozen_with_grad, "second": second}
    return out


@functools.cache
def _results(world: int) -> list[dict]:
    return run_gloo(_worker, world, timeout=300)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_ddp_step_matches_single_process(world, name):
    ref = _reference(name)
    for term in ("ce", "ce_aug", "aux", "cml", "ccl", "cwcl", "sdcl"):
        assert ref["terms"][term] > 0, f"{name}: reference term {term} is {ref['terms'][term]}"
    trained = ref["trained"]
    assert any(n.startswith(f"net.backbone.{'rein' if name == 'rein' else 'vit'}.") for n in trained)
    assert not any(n.startswith("net.backbone.vit.") and ".lora_" not in n and "base_layer.bias" not in n
                   for n in trained)
    assert set(ref["grads"]) == set(trained)  # 1 process: every trained tensor, and only those, has a gradient
    per_rank = _results(world)
    assert np.mean([r[name]["total"] for r in per_rank]) == pytest.approx(ref["total"], rel=RTOL)
    for term, want in ref["terms"].items():
        assert np.mean([r[name]["terms"][term] for r in per_rank]) == pytest.approx(want, rel=RTOL), term
    # atol from the largest gradient: LoRA's A factors from the minor singular components get gradients
    # ~1e-8 of that scale (B is tiny), where the two summation orders differ by ~1e-11 of it
    atol = 1e-10 * max(float(g.abs().max()) for g in ref["grads"].values())
    for rank, r in enumerate(per_rank):
        res = r[name]
        assert res["in_reducer"] == trained, "DDP's buckets must hold the trained parameters only"
        assert res["frozen_with_grad"] == []
        assert set(res["grads"]) == set(trained)
        for n, g in res["grads"].items():
            np.testing.assert_allclose(g, ref["grads"][n].numpy(), rtol=RTOL, atol=atol,
                                       err_msg=f"{name}, W={world}, rank {rank}: gradient of {n}")
        assert np.isfinite(res["second"])
