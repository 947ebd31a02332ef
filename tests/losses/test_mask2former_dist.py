"""BlindNet on a Mask2Former head: W gloo processes equal one process on the concatenated batch.

Global batch of 4 images at 64x64, ResNet-18 (output stride 32) with a tiny Mask2Former head
(width 32, 10 queries, 1 pixel-decoder layer, 2 decoder layers, 64 points per mask), float64, all
four BlindNet losses on (CWCL / SDCL on the pixel decoder's pd16, pd8, mask levels; CML / CCL at
the IN points), the aux head off. W=2 runs 2+2 images, W=3 runs 2+1+1; per rank: the same initial
weights with SyncBatchNorm2d, DDP (gloo), one forward of both views + backward with per-image
seeds from the global indices; the reference is one process with plain BatchNorm2d on all 4
images. Checked, for the scopes (covariance "batch", contrastive "global") and ("image", "image"):

  * mean over ranks of the total and of every term == the 1-process values (rtol 1e-6);
  * DDP-averaged gradients of every parameter == the 1-process gradients (rtol 1e-6);
  * the set loss communicates exactly one all-reduce of three integers per view (its
    normalizers): the Hungarian matching itself is per image and local.

The matcher and the mask-loss point sampling draw from torch.rand; the loss seeds them per
image (losses/mask2former.py), which is what makes a split-independent result possible.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from blindseg_dist.launcher import run_gloo
from blindseg_dist.losses.mask2former import Mask2FormerCriterion
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights

SPLITS = {2: [2, 2], 3: [2, 1, 1]}
RUN_SEED, STEP, CROP, K = 304, 7, 64, 5
RTOL = 1e-6
M2F = dict(hidden_dim=32, queries=10, encoder_layers=1, decoder_layers=2, heads=2, points=64)
CONFIGS = {
    "batch_global": LossWeights(aux=0.0, covariance_scope="batch", contrastive_scope="global"),
    "image_image": LossWeights(aux=0.0, covariance_scope="image", contrastive_scope="image"),
}


def make_net() -> nn.Module:
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=K, output_stride=32, aux=False, decode_head="mask2former",
                      mask2former=M2F)
    # sharper class and mask logits than at initialization, so that the prediction varies over the
    # image and between the views (SDCL needs pixels where they differ)
    with torch.no_grad():
        net.decoder.class_predictor.weight.mul_(20.0)
        net.decoder.transformer.decoder.mask_predictor.mask_embedder.layers[-1].get_submodule("0").weight.mul_(10.0)
        net.decoder.pixel_decoder.mask_projection.weight.mul_(10.0)
    return net.double().train()


@functools.cache
def make_batch() -> dict[str, torch.Tensor]:
    """Labels = the initial network's prediction of the original view on the left half and of the
    augmented view on the right half (SDCL needs pixels where the original view is right and the
    augmented one is not, and ground truth of the class the augmented view says), 10% of the
    pixels re-drawn, and an ignore strip."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, CROP, CROP, generator=g, dtype=torch.float64)
    image_aug = 0.6 * image + 0.8 * torch.randn(image.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        net = make_net()
        pred, pred_aug = net(image)["logits"].argmax(1), net(image_aug)["logits"].argmax(1)
    pred = torch.cat([pred[..., :CROP // 2], pred_aug[..., CROP // 2:]], dim=-1)
    noise = torch.randint(0, K, pred.shape, generator=g)
    label = torch.where(torch.rand(pred.shape, generator=g) < 0.1, noise, pred)
    label[0, :6] = 255
    return {"image": image, "image_aug": image_aug, "label": label}


def _step(obj, batch, lo, hi):
    out = obj(batch["image"][lo:hi], batch["label"][lo:hi], batch["image_aug"][lo:hi],
              step=STEP, global_index=torch.arange(lo, hi))
    out["total"].backward()
    return float(out["total"].detach()), {k: float(v.detach()) for k, v in out["terms"].items()}


def _reference(name: str) -> dict:
    obj = BlindNetObjective(make_net(), CONFIGS[name], run_seed=RUN_SEED).train()
    total, terms = _step(obj, make_batch(), 0, 4)
    return {"total": total, "terms": terms,
            "grads": {n: p.grad.detach().clone() for n, p in obj.named_parameters()}}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    refs = {name: _reference(name) for name in CONFIGS}
    path = tmp_path_factory.mktemp("m2f_ref") / "reference.pt"
    torch.save({"grads": {n: r["grads"] for n, r in refs.items()}, "batch": make_batch()}, path)
    return {"refs": refs, "path": str(path)}


def _worker(rank: int, world: int, ref_path: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from blindseg_dist import dist
    from blindseg_dist.model.syncbn import convert_sync_batchnorm

    blob = torch.load(ref_path, weights_only=True)
    batch = blob["batch"]
    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    out = {}
    for name in CONFIGS:
        obj = BlindNetObjective(convert_sync_batchnorm(make_net()), CONFIGS[name], run_seed=RUN_SEED).train()
        ddp = DDP(obj)
        dist.reset_comm_stats()
        total, terms = _step(ddp, batch, lo, hi)
        ref = blob["grads"][name]
        atol = 1e-12 * max(float(g.abs().max()) for g in ref.values())
        viol = {n: float(((p.grad - ref[n]).abs() / (atol + RTOL * ref[n].abs())).max())
                for n, p in obj.named_parameters() if p.grad is not None}
        err = {n: (float((p.grad - ref[n]).abs().max()), float(ref[n].abs().max()), atol)
               for n, p in obj.named_parameters() if p.grad is not None}
        out[name] = {"total": total, "terms": terms, "viol": viol, "err": err,
                     "missing": [n for n, p in obj.named_parameters() if p.grad is None],
                     "m2f_bytes": dist.comm_stats().get("m2f", {}).get("sent", 0)}
    return out


@functools.cache
def _results(world: int, ref_path: str) -> list[dict]:
    return run_gloo(_worker, world, ref_path, timeout=300)


@pytest.mark.parametrize("world", [2, 3])
def test_mask2former_blindnet_step_matches_single_process(references, world):
    per_rank = _results(world, references["path"])
    for name, ref in references["refs"].items():
        for term in ("m2f", "m2f_aug", "cml", "ccl", "cwcl", "sdcl"):  # every loss ran
            assert ref["terms"][term] > 0, f"{name}: term {term} is {ref['terms'][term]}"
        assert np.mean([r[name]["total"] for r in per_rank]) == pytest.approx(ref["total"], rel=RTOL)
        for term, want in ref["terms"].items():
            got = np.mean([r[name]["terms"][term] for r in per_rank])
            assert got == pytest.approx(want, rel=RTOL), f"{name}, W={world}: mean over ranks of {term}"
        ring = 2 * (world - 1) / world * 3 * 8  # one all-reduce of three int64 counts per view
        for rank, r in enumerate(per_rank):
            res = r[name]
            assert res["missing"] == []
            assert set(res["viol"]) == set(references["refs"][name]["grads"])
            worst = max(res["viol"].items(), key=lambda kv: kv[1])
            assert worst[1] <= 1.0, (f"{name}, W={world}, rank {rank}: gradient {worst[0]} off by {worst[1]:.3g} x tol "
                                     f"(max |diff|, max |ref|, atol: {res['err'][worst[0]]})")
            assert res["m2f_bytes"] == 2 * round(ring), f"{name}, rank {rank}: set-loss traffic {res['m2f_bytes']}"


def _criterion_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(3, 6, K + 1, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    msk = [torch.randn(3, 6, 8, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    label = torch.randint(0, K, (3, 32, 32), generator=g)
    label[2] = 255  # an image with no target mask at all
    return cls, msk, label


def test_criterion_draws_from_per_image_seeds():
    crit = Mask2FormerCriterion(K, points=16)
    cls, msk, label = _criterion_inputs()
    seeds = torch.tensor([[1, 2, 3], [4, 5, 6]])
    state = torch.get_rng_state()
    a = crit(cls, msk, label, seeds)
    assert torch.equal(torch.get_rng_state(), state), "the caller's random state must be left as it was"
    torch.rand(5)  # moving the global stream changes nothing
    b = crit(cls, msk, label, seeds)
    for k in ("total", "class", "mask", "dice"):
        assert float(a[k]) == float(b[k])
    c = crit(cls, msk, label, seeds + 100)  # other seeds: other sampled points, another value
    assert float(c["mask"]) != float(a["mask"])
    # one process on images [0, 1] + [2] with the same seeds = the whole batch (sums / global counts)
    parts = [crit([x[lo:hi] for x in cls], [x[lo:hi] for x in msk], label[lo:hi], seeds[:, lo:hi])
             for lo, hi in ((0, 2), (2, 3))]
    assert float(parts[1]["mask"]) == 0.0  # no target there: the image adds nothing to the mask terms
    assert float(parts[0]["mask"]) == pytest.approx(float(a["mask"]), rel=1e-12)
