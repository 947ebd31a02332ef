"""The distributed contract, on real gloo processes (docs/DISTRIBUTED.md, "The contract").

For every loss x scope, W ranks each compute the loss on their slice of a global batch of 4
images (W=2: 2+2, W=3: 2+1+1, W=4: 1+1+1+1) and must satisfy, in float64 at rtol 1e-6:
  mean_r L_r == L (1 process, concatenated batch),
  grad of rank r's local leaf inputs == W x the 1-process gradient of that slice
(so DDP's 1/W gradient averaging gives the exact 1-process parameter gradient).
Image 3 is entirely ignore (255): the rank holding it alone (W=3) has no valid pixel, no SDCL
anchor and only CWCL filler groups, and must still join every collective (no hang).
One spawn per W runs every case; the parent computes the 1-process references.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blindseg_dist import losses
from blindseg_dist.launcher import run_gloo

SPLITS = {2: [2, 2], 3: [2, 1, 1], 4: [1, 1, 1, 1]}
WORLDS = list(SPLITS)
RUN_SEED, STEP = 304, 7


def make_batch() -> dict[str, torch.Tensor]:
    """Global batch of 4 images, float64, deterministic."""
    g = torch.Generator().manual_seed(0)
    b, d, h, w = 4, 6, 12, 12
    y = torch.randint(0, 5, (b, h, w), generator=g)
    y[0, :2] = 255
    y[3] = 255  # an image with nothing valid

    def flip(t, p):
        noise = torch.randint(0, 5, t.shape, generator=g)
        return torch.where(torch.rand(t.shape, generator=g) < p, noise, t)
    pred = flip(y.clamp(max=4), 0.3)
    pred_aug = flip(pred, 0.5)
    pred_aug[3] = pred[3]
    emb = F.normalize(torch.randn(b, d, h, w, generator=g, dtype=torch.float64), dim=1)
    emb_aug = F.normalize(emb + 0.5 * torch.randn(b, d, h, w, generator=g,
                                                  dtype=torch.float64), dim=1)
    return {
        "f0": torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64),
        "fa0": torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64),
        "f1": torch.randn(b, 5, 3, 3, generator=g, dtype=torch.float64),
        "fa1": torch.randn(b, 5, 3, 3, generator=g, dtype=torch.float64),
        "emb": emb, "emb_aug": emb_aug, "labels": y, "pred": pred, "pred_aug": pred_aug,
        "logits": torch.randn(b, 5, h, w, generator=g, dtype=torch.float64),
    }


def _cov(fn, scope):
    def case(t, seeds):
        return fn([t["f0"], t["f1"]], [t["fa0"], t["fa1"]], scope=scope)
    return case, ("f0", "f1", "fa0", "fa1")


def _cwcl(negatives, scope, global_keys=6000):
    def case(t, seeds):
        return losses.class_wise_contrastive_loss(
            t["emb_aug"], t["emb"], t["labels"], t["pred"], negatives=negatives, scope=scope,
            max_classes=4, pixels_per_class=10, global_keys=global_keys, seeds=seeds)
    return case, ("emb_aug", "emb")


def _sdcl(scope, cap):
    def case(t, seeds):
        return losses.semantic_disentanglement_loss(
            t["emb_aug"], t["emb"], t["labels"], t["pred"], t["pred_aug"], scope=scope,
            num_negatives=8, max_anchors_per_image=cap, seeds=seeds)
    return case, ("emb_aug", "emb")


def _seg(scope):
    def case(t, seeds):
        return losses.segmentation_loss(t["logits"], t["labels"], scope=scope)
    return case, ("logits",)


CASES = {
    "cml_image": _cov(losses.covariance_matching_loss, "image"),
    "cml_batch": _cov(losses.covariance_matching_loss, "batch"),
    "ccl_image": _cov(losses.cross_covariance_loss, "image"),
    "ccl_batch": _cov(losses.cross_covariance_loss, "batch"),
    "cwcl_reference_image": _cwcl("reference", "image"),
    "cwcl_reference_global": _cwcl("reference", "global"),
    "cwcl_paper_image": _cwcl("paper", "image"),
    "cwcl_paper_global": _cwcl("paper", "global"),
    # the key budget binds: 50 of the 4 x 40 sampled keys, drawn over the global batch
    "cwcl_reference_global_budget": _cwcl("reference", "global", 50),
    "cwcl_paper_global_budget": _cwcl("paper", "global", 50),
    "sdcl_image": _sdcl("image", 1000),
    "sdcl_global": _sdcl("global", 1000),
    "sdcl_image_cap": _sdcl("image", 3),  # cap binds: 3 x 4 anchors kept of ~100
    "sdcl_global_cap": _sdcl("global", 3),
    "seg_exact": _seg("exact"),
    "seg_reference": _seg("reference"),
}


def _run_case(name, tensors, indices):
    fn, leaf_names = CASES[name]
    t = {k: (v[indices].clone().requires_grad_(k in leaf_names) if v.is_floating_point()
             else v[indices].clone()) for k, v in tensors.items()}
    seeds = losses.sample_seeds(RUN_SEED, STEP, indices)
    loss = fn(t, seeds)
    loss.backward()
    grads = {k: (t[k].grad.numpy() if t[k].grad is not None else np.zeros(t[k].shape))
             for k in leaf_names}
    return float(loss.detach()), grads


def _worker(rank, world, split):
    from blindseg_dist import dist

    start = sum(split[:rank])
    idx = torch.arange(start, start + split[rank])
    out = {}
    for name in CASES:
        dist.reset_comm_stats()
        loss, grads = _run_case(name, make_batch(), idx)
        out[name] = (loss, grads, dist.comm_stats())
    out["anchors"] = _anchor_counts(idx)
    out["collectives"] = _collectives(rank, world)
    return out


def _collectives(rank, world):
    """dist.py directly: variable-size autograd all_gather (rank r holds r rows, rank 0
    none) and autograd all_reduce_sum, each under a loss identical on every rank."""
    from blindseg_dist import dist

    x = torch.arange(1.0, rank + 1, dtype=torch.float64).view(rank, 1).requires_grad_()
    g = dist.all_gather(x * 2, tag="t")  # (0 + 1 + ... + W-1, 1)
    weights = torch.arange(g.shape[0], dtype=torch.float64).view(-1, 1)
    (g * weights).sum().backward()
    y = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    s = dist.all_reduce_sum(y * y, tag="t")
    (s * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    return {"gathered": g.detach().flatten().tolist(), "gather_grad": x.grad.flatten().tolist(),
            "reduced": s.detach().tolist(), "reduce_grad": y.grad.tolist(),
            "sizes": dist.gather_sizes(rank, tag="t"),
            "count": dist.all_reduce_count([rank, 1], tag="t").tolist()}


def _anchor_counts(idx):
    """(local, global) SDCL anchor counts per (scope, cap): shows what each case exercised."""
    t = make_batch()
    counts = {}
    for scope in ("image", "global"):
        for cap in (1000, 3):
            _, det = losses.semantic_disentanglement_loss(
                t["emb_aug"][idx], t["emb"][idx], t["labels"][idx], t["pred"][idx],
                t["pred_aug"][idx], scope=scope, num_negatives=8, max_anchors_per_image=cap,
                seeds=losses.sample_seeds(RUN_SEED, STEP, idx), return_details=True)
            counts[scope, cap] = (det["anchors"][0].numel(), det["num_anchors_global"])
    return counts


@functools.cache
def _results(world):
    return run_gloo(_worker, world, SPLITS[world], timeout=170)


@functools.cache
def _reference(name):
    return _run_case(name, make_batch(), torch.arange(4))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [n for n in CASES if n != "seg_reference"])
def test_contract(world, name):
    per_rank = _results(world)
    ref_loss, ref_grads = _reference(name)
    losses_r = [r[name][0] for r in per_rank]
    assert np.mean(losses_r) == pytest.approx(ref_loss, rel=1e-6, abs=1e-12)
    split = SPLITS[world]
    for rank, r in enumerate(per_rank):
        lo, hi = sum(split[:rank]), sum(split[:rank + 1])
        for k, g in r[name][1].items():
            np.testing.assert_allclose(g, world * ref_grads[k][lo:hi], rtol=1e-6, atol=1e-12,
                                       err_msg=f"{name}: rank {rank} gradient of {k}")


@pytest.mark.parametrize("world", WORLDS)
def test_reference_segmentation_is_a_mean_of_local_means(world):
    """scope="reference" is the per-rank mean: exact only with equal valid counts."""
    per_rank = _results(world)
    t = make_batch()
    split = SPLITS[world]
    for rank, r in enumerate(per_rank):
        lo, hi = sum(split[:rank]), sum(split[:rank + 1])
        y = t["labels"][lo:hi]
        want = (F.cross_entropy(t["logits"][lo:hi], y, ignore_index=255)
                if (y != 255).any() else torch.tensor(0.0))
        assert r["seg_reference"][0] == pytest.approx(float(want), rel=1e-9)
    ref = _reference("seg_exact")[0]
    assert np.mean([r["seg_reference"][0] for r in per_rank]) != pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("world", WORLDS)
def test_loss_collectives_are_counted(world):
    per_rank = _results(world)
    assert len(per_rank) == world
    d = make_batch()["emb"].shape[1]
    for r in per_rank:
        rec = {name: {tag: c["received"] for tag, c in r[name][2].items()} for name in CASES}
        assert rec["cml_batch"]["cml"] > 0 and rec["sdcl_global"]["sdcl"] > 0
        assert rec["cwcl_reference_global"]["cwcl"] > 0 and rec["seg_exact"]["seg"] > 0
        assert set(r["seg_exact"][2]) == {"seg"}
        # only chosen rows move: the budget bounds what CWCL receives (50 keys of 6 float64,
        # plus the class-id column for "paper", plus a few int64 of metadata per image)
        meta = 8 * (3 * world + 4 * 2)  # sizes, seeds, eligibility count
        assert rec["cwcl_reference_global_budget"]["cwcl"] <= 50 * d * 8 + meta
        assert rec["cwcl_paper_global_budget"]["cwcl"] <= 50 * (d + 1) * 8 + meta
        assert rec["cwcl_reference_global_budget"]["cwcl"] < rec["cwcl_reference_global"]["cwcl"]
        # SDCL moves at most its C x K negatives (forward and backward) + metadata
        assert rec["sdcl_global"]["sdcl"] <= 2 * 5 * 8 * d * 8 + 8 * (2 * 513 + 8 * 4 + world)
        for name in ("cml_batch", "ccl_batch"):  # no backward all-reduce: sent == received
            tag = name.split("_")[0]
            assert r[name][2][tag]["sent"] == r[name][2][tag]["received"] > 0


@pytest.mark.parametrize("world", WORLDS)
def test_sdcl_cases_exercise_the_cap_and_an_empty_rank(world):
    per_rank = _results(world)
    for key in [("image", 1000), ("global", 1000), ("image", 3), ("global", 3)]:
        local = [r["anchors"][key][0] for r in per_rank]
        glob = {r["anchors"][key][1] for r in per_rank}
        assert len(glob) == 1 and sum(local) == glob.pop()
        if key[1] == 3:
            assert sum(local) == 3 * 4  # the cap binds: 3 anchors per image of the global batch
        else:
            assert sum(local) > 3 * 4
        if world in (3, 4):
            assert local[-1] == 0  # the last rank holds only the all-ignore image


@pytest.mark.parametrize("world", WORLDS)
def test_dist_collectives_sum_gradients_across_ranks(world):
    per_rank = _results(world)
    rows = [2.0 * v for r in range(world) for v in range(1, r + 1)]
    offsets = [sum(range(r)) for r in range(world)]
    for rank, r in enumerate(per_rank):
        c = r["collectives"]
        assert c["gathered"] == rows and c["sizes"] == list(range(world))
        assert c["count"] == [sum(range(world)), world]
        # every rank's loss sends 2 * weight to each row: the backward sums W of them
        want = [world * 2.0 * (offsets[rank] + i) for i in range(rank)]
        assert c["gather_grad"] == pytest.approx(want)
        total = sum((q + 1) ** 2 for q in range(world))
        assert c["reduced"] == pytest.approx([total] * 3)
        assert c["reduce_grad"] == pytest.approx([world * w * 2 * (rank + 1) for w in (1, 2, 3)])


def test_single_process_paths_issue_no_collective():
    from blindseg_dist import dist

    dist.reset_comm_stats()
    x = torch.ones(2, 3, requires_grad=True)
    assert not dist.is_distributed() and dist.world_size() == 1 and dist.rank() == 0
    assert dist.all_reduce_sum(x, tag="t") is x and dist.all_gather(x, tag="t") is x
    assert dist.gather_sizes(5, tag="t") == [5]
    assert dist.all_reduce_count([3], tag="t").tolist() == [3]
    dist.barrier()
    assert dist.comm_stats() == {}
    assert dist.global_mean(torch.tensor(6.0), 3).item() == 2.0
