"""CWCL "reference" at a level where no image of the batch has an eligible class.

Released rule: a batch whose images have no class with more than pixels_per_class pixels returns 0
for that level (and the level still counts in the mean over the three levels); a batch where
at least one image has such a class is computed as usual, the class-less images contributing
their random filler groups. "paper" keeps the filler behaviour in both cases. The decision is
taken on the global batch, so W ranks still equal one process (gloo cases at the bottom).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blindseg_dist.launcher import run_gloo
from blindseg_dist import losses
from blindseg_dist.losses.contrastive import cwcl_plan

K, P, TAU = 3, 10, 0.07


def _emb(b, d=5, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, d, h, w, generator=g, dtype=torch.float64), dim=1)
    emb_aug = F.normalize(emb + 0.5 * torch.randn(b, d, h, w, generator=g, dtype=torch.float64), dim=1)
    return emb_aug.requires_grad_(), emb.requires_grad_()


def _labels(b, pixels_of_class_1, h=8, w=8):
    """Each image: ``pixels_of_class_1[i]`` pixels of class 1, the rest class 2 with at most P pixels,
    then ignore."""
    y = torch.full((b, h * w), 255, dtype=torch.long)
    for i, n in enumerate(pixels_of_class_1):
        y[i, :n] = 1
        y[i, n:n + P] = 2  # exactly P pixels: never eligible (the rule is "more than P")
    return y.view(b, h, w)


def _cwcl(emb_aug, emb, y, negatives, seeds, **kw):
    return losses.class_wise_contrastive_loss(emb_aug, emb, y, y.clone(), negatives=negatives,
                                              max_classes=K, pixels_per_class=P, seeds=seeds, tau=TAU, **kw)


def test_reference_level_without_eligible_class_is_a_connected_zero():
    emb_aug, emb = _emb(2)
    y = _labels(2, [P, 0])  # class 1 has exactly P pixels in image 0: not eligible either
    seeds = losses.sample_seeds(1, 2, torch.arange(2))
    loss = _cwcl(emb_aug, emb, y, "reference", seeds)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert emb_aug.grad is not None and float(emb_aug.grad.abs().max()) == 0.0
    # "paper" keeps contrasting the random filler groups
    paper = _cwcl(emb_aug.detach(), emb.detach(), y, "paper", seeds)
    assert paper.item() > 0.1
    # one more pixel makes class 1 eligible: the level is computed again
    assert _cwcl(emb_aug.detach(), emb.detach(), _labels(2, [P + 1, 0]), "reference", seeds).item() > 0.1


def test_reference_keeps_the_classless_images_of_a_batch_with_a_class():
    """Image 0 has an eligible class, image 1 none: image 1 still contributes its filler anchors
    (released: the per-image branch samples random patches once the batch has any class)."""
    emb_aug, emb = _emb(2, seed=3)
    y = _labels(2, [30, 0])
    seeds = losses.sample_seeds(1, 2, torch.arange(2))
    loss = _cwcl(emb_aug, emb, y, "reference", seeds)
    idx, ids = cwcl_plan(y, y.clone(), (8, 8), max_classes=K, pixels_per_class=P, seeds=seeds)
    assert bool((ids[1] >= 256).all()) and bool((ids[0] < 256).any())
    per_image = []
    for i in range(2):  # reference negatives: every sampled key of the image, the positive included
        anc = emb_aug[i].flatten(1).T[idx[i]]
        key = emb[i].detach().flatten(1).T[idx[i]]
        logits = anc @ key.T / TAU
        per_image.append((torch.logsumexp(torch.cat([logits.diagonal()[:, None], logits], 1), 1)
                          - logits.diagonal()).mean())
    torch.testing.assert_close(loss, torch.stack(per_image).mean(), rtol=1e-12, atol=1e-12)
    assert per_image[1].item() > 0.1  # the class-less image is really in the mean


def test_objective_counts_a_zero_level_in_the_mean_over_levels(monkeypatch):
    """At crop 64 the layer4 level (4 x 4 = 16 pixels) can hold no class of more than 50 pixels:
    its CWCL is 0 and the term is the mean of (0, level 1, level 2)."""
    from blindseg_dist.model import build_model
    from blindseg_dist.model import objective as obj_mod
    from blindseg_dist.model.objective import BlindNetObjective, LossWeights

    seen = []

    def record(*args, **kwargs):
        value = losses.class_wise_contrastive_loss(*args, **kwargs)
        seen.append(value.detach())
        return value

    monkeypatch.setattr(obj_mod, "class_wise_contrastive_loss", record)
    torch.manual_seed(0)
    net = build_model("resnet18")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=g)
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[:, 32:] = 13  # two classes of 2048 pixels each at full resolution
    obj = BlindNetObjective(net, LossWeights(cwcl_negatives="reference"), run_seed=1).train()
    out = obj(image, label, image + 0.3 * torch.randn(image.shape, generator=g), step=0)
    assert len(seen) == 3 and seen[0].item() == 0.0 and seen[1].item() > 0 and seen[2].item() > 0
    torch.testing.assert_close(out["terms"]["cwcl"].detach(), torch.stack(seen).mean())
    out["total"].backward()
    head0 = net.proj_heads[0].body[0].weight.grad
    assert head0 is not None  # the zero level keeps its projection head in the graph (no unused params)


# ----------------------------------------------------------------------------- distributed

GLOBAL = {"none": [0, 0, 0, 0], "one_rank": [30, 0, 0, 0]}  # class-1 pixels of the 4 images


def _batch(case):
    emb_aug, emb = _emb(4, seed=11)
    return emb_aug.detach(), emb.detach(), _labels(4, GLOBAL[case])


def _run(case, negatives, scope, indices):
    emb_aug, emb, y = _batch(case)
    a = emb_aug[indices].clone().requires_grad_()
    e = emb[indices].clone().requires_grad_()
    loss = _cwcl(a, e, y[indices], negatives, losses.sample_seeds(5, 9, indices), scope=scope)
    loss.backward()
    return float(loss.detach()), a.grad.numpy().copy()


def _worker(rank, world):
    from blindseg_dist import dist

    idx = torch.arange(2 * rank, 2 * rank + 2)  # 2 images per rank
    out = {}
    for case in GLOBAL:
        for scope in ("image", "global"):
            dist.reset_comm_stats()
            out[case, scope] = (*_run(case, "reference", scope, idx), dist.comm_stats().get("cwcl", {}).get("received", 0))
    return out


@functools.cache
def _results():
    return run_gloo(_worker, 2, timeout=170)


@pytest.mark.parametrize("scope", ["image", "global"])
@pytest.mark.parametrize("case", list(GLOBAL))
def test_two_ranks_equal_one_process(case, scope):
    """"none": no rank has a class -> every rank returns the connected 0 (nobody hangs in the
    collectives that follow). "one_rank": only rank 0's images have one -> rank 1's class-less
    images still contribute (the released per-GPU rule would give rank 1 a 0), as in one process."""
    per_rank = _results()
    assert len(per_rank) == 2
    ref_loss, ref_grad = _run(case, "reference", scope, torch.arange(4))
    assert np.mean([r[case, scope][0] for r in per_rank]) == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    for rank, r in enumerate(per_rank):
        np.testing.assert_allclose(r[case, scope][1], 2 * ref_grad[2 * rank:2 * rank + 2], rtol=1e-9, atol=1e-12)
        assert r[case, scope][2] > 0  # the eligibility count was all-reduced (tag "cwcl")
    if case == "none":
        assert ref_loss == 0.0 and all(r[case, scope][0] == 0.0 for r in per_rank)
    else:
        assert ref_loss > 0 and per_rank[1][case, scope][0] > 0
