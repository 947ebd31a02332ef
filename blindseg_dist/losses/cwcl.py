"""Class-wise contrastive loss (CWCL) for one decoder level (docs/METHOD.md, "Losses"): its sampling
(classes, hard and easy anchors, filler groups; cwcl_plan) and the loss in its two scopes ("image":
the anchor's own image's keys; "global": a budget of keys drawn from the whole global batch) and two
negative modes ("reference": every key; "paper": keys of other classes only).

Per image, the generator is drawn from in this order (and nothing else): class-sampling keys
rand(N), filler keys rand(N), and only when the image has fewer pixels than the filler slots need,
randint(N, (need,)) (with replacement); all float64 on the CPU, then moved to the data's device.
"""

from __future__ import annotations

import numpy as np
import torch

from blindseg_dist import dist
from blindseg_dist.config import CONTRASTIVE_SCOPES as SCOPES
from blindseg_dist.config import CWCL_NEGATIVES as NEGATIVES
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.losses.pixels import check_choice, check_embeddings, connected_zero, info_nce, math_dtype, take
from blindseg_dist.losses.sampling import (NUM_IDS, global_meta, ids_at, image_generators, quotas, rand_keys,
                                           rank_bounds, rank_in_group)

PSEUDO_BASE = 256  # CWCL filler groups get ids >= 256 (their own pseudo-class)


# ----------------------------------------------------------------------------- sampling

def _sample_image_anchors(y: torch.Tensor, p: torch.Tensor, gen, max_classes: int,
                          per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (K*P,) pixel indices and their class ids (pseudo-classes >= 256)."""
    n, dev = y.numel(), y.device
    keys = rand_keys(n, gen, dev)
    fill_keys = rand_keys(n, gen, dev)
    counts = torch.bincount(y[y != IGNORE], minlength=NUM_IDS)  # (256,)
    cand = torch.nonzero(counts > per_class).flatten()[:max_classes]  # ascending ids
    n_cls = cand.numel()
    slot_of = torch.full((NUM_IDS,), -1, dtype=torch.long, device=dev)
    slot_of[cand] = torch.arange(n_cls, device=dev)
    pix = torch.nonzero(slot_of[y] >= 0).flatten()  # pixels of candidate classes
    group = slot_of[y[pix]] * 2 + (p[pix] == y[pix]).long()  # 2s: hard, 2s+1: easy
    hist = torch.bincount(group, minlength=2 * n_cls).view(n_cls, 2)
    n_hard, n_easy = hist[:, 0], hist[:, 1]
    # aim P//2 hard + the rest easy; a short set is filled by the other (n_hard + n_easy > P)
    take_hard = torch.minimum(n_hard, torch.clamp(per_class - n_easy, min=per_class // 2))
    quota = torch.stack([take_hard, per_class - take_hard], dim=1).flatten()  # (2*n_cls,)
    order, rank = rank_in_group(keys[pix], group, 2 * n_cls)
    sel = pix[order[rank < quota[group[order]]]]  # grouped by slot: hard then easy, by key
    need = (max_classes - n_cls) * per_class
    if need <= n:  # filler groups: disjoint random pixels (any pixel, ignore included)
        fill = torch.argsort(fill_keys)[:need]
    else:  # fewer pixels than filler slots: draw with replacement (documented behaviour)
        g_dev = gen.device if gen is not None else torch.device("cpu")
        fill = torch.randint(n, (need,), generator=gen, device=g_dev).to(dev)
    pseudo = PSEUDO_BASE + torch.arange(n_cls, max_classes, device=dev)
    ids = torch.cat([y[sel], pseudo.repeat_interleave(per_class)])
    return torch.cat([sel, fill]), ids


def sample_class_anchors(labels: torch.Tensor, pred: torch.Tensor, *, max_classes: int = 15,
                         pixels_per_class: int = 50, generator: torch.Generator | None = None,
                         seeds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CWCL sampler (what class_wise_contrastive_loss uses), exposed for tests and tools.

    labels, pred: (B, h, w) ids at the embedding resolution. Returns (index, class_id), both
    (B, max_classes * pixels_per_class) int64: flat pixel indices into h*w, and the class of
    each sample (real id, or 256 + slot for a filler group, each its own pseudo-class).
    Rules: candidate classes = ids != 255 with more than pixels_per_class pixels, ascending,
    at most max_classes; per class P//2 hard (pred != class) + the rest easy, the short set
    filled by the other, without replacement; remaining slots: disjoint random pixels of
    the image (with replacement only when the image has fewer pixels than those slots).
    """
    b = labels.shape[0]
    y = ids_at(labels, tuple(labels.shape[-2:]), "labels")
    p = ids_at(pred, tuple(labels.shape[-2:]), "pred")
    gens = image_generators(b, generator, seeds)
    out = [_sample_image_anchors(y[i], p[i], gens[i], max_classes, pixels_per_class)
           for i in range(b)]
    m = max_classes * pixels_per_class
    if not out:
        empty = torch.zeros(0, m, dtype=torch.long, device=labels.device)
        return empty, empty.clone()
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def cwcl_plan(labels: torch.Tensor, pred: torch.Tensor, size: tuple[int, int], *,
              max_classes: int = 15, pixels_per_class: int = 50,
              generator: torch.Generator | None = None, seeds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CWCL's sampling at embedding resolution ``size`` = (h, w): (index, class_id), both (B, M).

    Depends on labels, predictions and seeds only, so a caller can sample first and evaluate
    the (per-pixel) projection heads at the sampled pixels alone (cwcl_pixels); passing the
    plan back to class_wise_contrastive_loss then gives exactly the dense result.
    """
    b = labels.shape[0]
    y = ids_at(labels, size, "labels").view(b, *size)
    p = ids_at(pred, size, "pred").view(b, *size)
    return sample_class_anchors(y, p, max_classes=max_classes, pixels_per_class=pixels_per_class,
                                generator=generator, seeds=seeds)


def cwcl_pixels(plan: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
    """Flat indices into (B * h * w) of every pixel CWCL reads (same pixels in both views)."""
    idx = plan[0]
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).flatten()


def _draw_global_keys(ids: torch.Tensor, sizes: list[int], offset: int, global_keys: int, seeds,
                       generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The "global" key budget, split-invariant: per-image quotas of a uniform ``global_keys``-subset
    of all sampled keys (multivariate hypergeometric), then per image a seeded choice of its slots,
    both from the batch seed of global_meta. -> (image, slot) of this rank's chosen keys, and how
    many keys each rank contributes."""
    b, m = ids.shape
    b_global = sum(sizes)
    _, seed = global_meta(ids.new_zeros((b, 0)), seeds, generator, sizes, tag="cwcl")
    quota = quotas(np.full(b_global, m), global_keys, seed, salt=0)  # keys per image
    slots = [np.sort(np.random.default_rng([seed, 1, offset + i]).choice(
        m, int(quota[offset + i]), replace=False)) for i in range(b)]
    img_l = torch.as_tensor(np.repeat(np.arange(b), quota[offset: offset + b]),
                            dtype=torch.long, device=ids.device)
    slot_l = torch.as_tensor(np.concatenate(slots) if b else np.zeros(0),
                             dtype=torch.long, device=ids.device)
    per_rank = [int(quota[lo:hi].sum()) for lo, hi in rank_bounds(sizes)]
    return img_l, slot_l, per_rank


# ----------------------------------------------------------------------------- the loss

def class_wise_contrastive_loss(emb_aug: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor,
                                pred: torch.Tensor, *, negatives: str = "reference",
                                scope: str = "image", tau: float = 0.07, max_classes: int = 15,
                                pixels_per_class: int = 50, global_keys: int = 750,
                                generator: torch.Generator | None = None,
                                seeds=None, plan=None) -> torch.Tensor:
    """CWCL for one level. Anchors z_a(p) (augmented view, with grad), positive z(p) and keys
    z(q) detached; loss = mean over the K*P anchors of every image of the global batch.

    negatives="reference": every sampled key is a negative (the released code's inert class
    mask: the positive itself and same-class keys included; produced the published numbers);
    and, as released, a level where no image of the (global) batch has a class with more than
    pixels_per_class pixels contributes 0 (still connected to the graph) instead of contrasting
    random pixels; the caller still counts it in the mean over the levels.
    negatives="paper": keys of other classes only (filler groups are their own classes).
    scope="image": keys of the anchor's own image; "global": a budget of `global_keys` keys
    drawn uniformly from the sampled keys of every image of every rank (all of them when the
    global batch has no more), the same keys for every anchor of the step; only the chosen
    keys move (detached, one all-to-all), anchors stay local. The draw: per-image quotas from
    a multivariate hypergeometric draw, then per image a seeded choice of its slots, both from
    the batch seed of global_meta, so it is split-independent (loss.cwcl_global_keys; the
    default 750 = as many keys as the image scope scores every anchor against, docs/DISTRIBUTED.md
    "Budgeted global scopes").
    plan: the result of cwcl_plan for these inputs (then no sampling happens here).
    """
    _check_arguments(emb_aug, emb, negatives, scope, global_keys)
    b, d, h, w = emb_aug.shape
    if plan is None:
        plan = cwcl_plan(labels, pred, (h, w), max_classes=max_classes,
                         pixels_per_class=pixels_per_class, generator=generator, seeds=seeds)
    idx, ids = plan  # (B, M) each
    # the released rule for a level without eligible class, decided on the device: the loss is
    # computed either way and replaced by a connected zero there (no host read, same collectives)
    eligible = _any_class_eligible(ids) if negatives == "reference" else None
    with torch.autocast(device_type=emb_aug.device.type, enabled=False):
        dt = math_dtype(emb_aug)
        flat = idx + torch.arange(b, device=idx.device)[:, None] * (h * w)  # (B, M) into B*h*w
        anc = take(emb_aug, flat, dt) / tau  # (B, M, D) with grad, scaled: logits come out / tau
        keys = take(emb.detach(), flat, dt)  # (B, M, D); key j = anchor j's positive
        pos = (anc * keys).sum(-1)  # (B, M) / tau
        if scope == "image":
            local_sum, n_global = _image_scope(anc, keys, pos, ids, negatives)
        else:
            local_sum, n_global = _global_scope(anc, keys, pos, ids, negatives, max_classes, global_keys,
                                                generator, seeds)
        loss = dist.global_mean(local_sum, n_global) + connected_zero(emb_aug, emb)
    if eligible is not None:
        loss = torch.where(eligible, loss, connected_zero(emb_aug, emb))
    return loss


def _check_arguments(emb_aug, emb, negatives: str, scope: str, global_keys) -> None:
    check_choice(negatives, NEGATIVES, "loss.cwcl_negatives (class_wise_contrastive_loss)")
    check_choice(scope, SCOPES, "loss.contrastive_scope (class_wise_contrastive_loss)")
    check_embeddings(emb_aug, emb, "class_wise_contrastive_loss")
    if isinstance(global_keys, bool) or not isinstance(global_keys, int) or global_keys < 1:
        raise ValueError(f"loss.cwcl_global_keys must be a positive integer, got {global_keys!r}")


def _image_scope(anc: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
                 negatives: str) -> tuple[torch.Tensor, int]:
    """Every anchor against the M keys of its own image -> (sum over the local anchors, global
    anchor count)."""
    b, m = ids.shape
    n_global = dist.all_reduce_count([b], tag="cwcl")[0] * m
    neg = anc @ keys.transpose(1, 2)  # (B, M, M)
    if negatives == "paper":
        neg = neg.masked_fill(ids[:, :, None] == ids[:, None, :], float("-inf"))
    return info_nce(pos.flatten(), neg.flatten(0, 1)).sum(), n_global


def _global_scope(anc: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
                  negatives: str, max_classes: int, global_keys: int, generator,
                  seeds) -> tuple[torch.Tensor, int]:
    """Every anchor against the same budget of keys from the whole global batch; only the chosen
    keys move (detached, one all-to-all), anchors stay local -> (sum over the local anchors,
    global anchor count)."""
    b, m = ids.shape
    d = keys.shape[-1]
    sizes = dist.gather_sizes(b, tag="cwcl", device=anc.device)
    offset = sum(sizes[:dist.rank()])
    img_l, slot_l, per_rank = _draw_global_keys(ids, sizes, offset, global_keys, seeds, generator)
    own = keys[img_l, slot_l]  # (G_r, D) this rank's chosen keys, detached
    if negatives == "paper":
        gid = _global_ids(ids[img_l, slot_l], img_l + offset, max_classes)
        own = torch.cat([own, gid.to(own.dtype)[:, None]], dim=1)  # ids < 2^24: exact in fp32
    shared = dist.share_rows(own, per_rank, tag="cwcl")  # (G, D [+ 1]) same on all ranks
    all_keys = shared[:, :d]
    local_sum = anc.new_zeros(())
    if negatives == "paper":
        img = torch.arange(offset, offset + b, device=ids.device)[:, None]
        gids = _global_ids(ids, img, max_classes)  # (B, M)
        all_ids = shared[:, d].long()
    for i in range(b):  # per image: bounds memory to (M, G)
        neg = anc[i] @ all_keys.T  # (M, G)
        if negatives == "paper":
            neg = neg.masked_fill(gids[i][:, None] == all_ids[None, :], float("-inf"))
        local_sum = local_sum + info_nce(pos[i], neg).sum()
    return local_sum, sum(sizes) * m


def _global_ids(ids: torch.Tensor, image: torch.Tensor, max_classes: int) -> torch.Tensor:
    """Class ids unique over the global batch: a filler pseudo-class becomes 256 + global image x
    max_classes + slot (real classes keep their id)."""
    return torch.where(ids >= PSEUDO_BASE, ids + image * max_classes, ids)


def _any_class_eligible(ids: torch.Tensor) -> torch.Tensor:
    """The released rule for a level without eligible class: a 0-dim bool tensor on the device, True
    when some image of the GLOBAL batch has a real candidate class (id < 256, more than
    pixels_per_class pixels). The released code decides on its per-GPU batch; deciding on the global
    batch keeps W ranks equal to one process on the concatenated batch (identical for one process).
    One count all-reduce, never read by the host: every rank runs the same collectives."""
    local = (ids < PSEUDO_BASE).any(dim=1).sum().view(1)  # (1,) int64 (0 for an empty batch)
    return dist.all_reduce_count(local, tag="cwcl", device=ids.device)[0] > 0
