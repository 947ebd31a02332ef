"""Semantic disentanglement contrastive loss (SDCL) for one decoder level (docs/METHOD.md, "Losses"):
its sampling (anchors on the correction map, the anchor cap, per-class negatives; sdcl_plan) and the
loss in its two scopes ("image": negatives of the anchor's own image; "global": negatives drawn from
the whole global batch, only those rows moved, with gradient).

Per image, the generator is drawn from in this order (and nothing else): negative keys rand(N),
anchor-cap keys rand(N); all float64 on the CPU, then moved to the data's device.
"""

from __future__ import annotations

import numpy as np
import torch

from blindseg_dist import dist
from blindseg_dist.config import CONTRASTIVE_SCOPES as SCOPES
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.losses.pixels import check_choice, check_embeddings, connected_zero, info_nce, math_dtype, take
from blindseg_dist.losses.sampling import (NUM_IDS, global_meta, ids_at, image_generators, keep_smallest, quotas,
                                           rand_keys, rank_bounds, rank_in_group)


# ----------------------------------------------------------------------------- sampling

def sdcl_plan(labels: torch.Tensor, pred: torch.Tensor, pred_aug: torch.Tensor,
              size: tuple[int, int], *, scope: str = "image", num_negatives: int = 20,
              max_anchors_per_image: int = 1000, generator: torch.Generator | None = None,
              seeds=None, keys: torch.Tensor | None = None) -> dict:
    """SDCL's sampling at embedding resolution ``size``: anchors, negatives and counts.

    Index math and count collectives only (no embedding is read), so the projection heads can
    be evaluated at sdcl_pixels(plan) alone; semantic_disentanglement_loss(plan=...) then
    gives exactly the dense result. ``keys``: the per-pixel keys (B, 2, N) float64 (negative
    choice, anchor cap) already drawn from the images' generators (the loader's plans,
    losses/plans.py): the same draws, without drawing them here.
    """
    check_choice(scope, SCOPES, "loss.contrastive_scope (semantic_disentanglement_loss)")
    h, w = size
    b = labels.shape[0]
    n, dev = h * w, labels.device
    y = ids_at(labels, (h, w), "labels")  # (B, N)
    p = ids_at(pred, (h, w), "pred")
    pa = ids_at(pred_aug, (h, w), "pred_aug")
    if keys is None:
        neg_keys, anc_keys = _pixel_keys(b, n, dev, generator, seeds)  # (B, N) each
    elif tuple(keys.shape) != (b, 2, n):
        raise ValueError(f"sdcl_plan: keys must be (B, 2, N) = {(b, 2, n)}, got {tuple(keys.shape)}")
    else:
        neg_keys, anc_keys = keys[:, 0], keys[:, 1]
    valid = y != IGNORE
    corr = (p == y) & (pa != p) & valid  # correction map M, (B, N)
    img = torch.arange(b, device=dev)[:, None].expand(b, n)
    gt_hist = torch.bincount((img * NUM_IDS + y)[valid], minlength=b * NUM_IDS)
    gt_hist = gt_hist.view(b, NUM_IDS)  # (B, 256) ground-truth pixels per image and class
    if scope == "global":
        return _sdcl_plan_global(y, p, pa, neg_keys, anc_keys, corr, gt_hist, valid, (h, w),
                                 num_negatives, max_anchors_per_image, generator, seeds)
    return _sdcl_plan_image(y, pa, neg_keys, anc_keys, corr, gt_hist, valid, img, (h, w), num_negatives,
                            max_anchors_per_image)


def _pixel_keys(b: int, n: int, dev: torch.device, generator, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, from its own generator: negative-choice keys, then anchor-cap keys -> (B, N) each."""
    gens = image_generators(b, generator, seeds)
    draws = [torch.stack([rand_keys(n, g, dev), rand_keys(n, g, dev)]) for g in gens]  # (2, N) each
    keys = torch.stack(draws, 1) if draws else torch.zeros(2, 0, n, dtype=torch.float64,
                                                           device=dev)
    return keys[0], keys[1]


def _sdcl_plan_image(y, pa, neg_keys, anc_keys, corr, gt_hist, valid, img, size, num_negatives,
                     max_anchors_per_image) -> dict:
    """SDCL "image" sampling: classes with num_negatives ground-truth pixels in the image keep
    their anchors (capped over the global batch), negatives = the num_negatives smallest keys of
    ground-truth class c in the image, per (image, class) that keeps anchors."""
    b, dev = y.shape[0], y.device
    b_global = int(dist.all_reduce_count([b], tag="sdcl", device=dev)[0])
    class_ok = gt_hist >= num_negatives  # (B, 256)
    is_anchor = corr & class_ok.gather(1, pa)
    ab, ap, n_global = _cap_anchors(is_anchor, anc_keys, max_anchors_per_image * b_global)
    ac = pa[ab, ap]  # (A,) anchor class
    plan = {"scope": "image", "size": size, "batch": b, "num_negatives": num_negatives,
            "anchors": (ab, ap), "anchor_class": ac, "num_anchors_global": n_global}
    # groups (image, class) that keep anchors; 20 smallest negative keys of GT c in b
    need = torch.unique(ab * NUM_IDS + ac)  # (G,) ascending
    need_mask = torch.zeros(b * NUM_IDS, dtype=torch.bool, device=dev)
    need_mask[need] = True
    grp = img * NUM_IDS + y  # (B, N); ignore pixels never needed (class_ok false)
    cand = torch.nonzero(need_mask[grp.flatten()] & valid.flatten()).flatten()
    order, rank = rank_in_group(neg_keys.flatten()[cand], grp.flatten()[cand],
                                b * NUM_IDS)
    plan["negatives"] = cand[order[rank < num_negatives]].view(-1, num_negatives)  # (G, K)
    plan["groups"] = need
    return plan


def _cap_anchors(is_anchor: torch.Tensor, anc_keys: torch.Tensor, cap: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Anchor cap, split-independent: keep the globally smallest ``cap`` anchor keys. Each rank
    sends its local smallest min(n_local, cap) keys (the global smallest are among them).
    -> (image, pixel) of the kept anchors and the global count of kept anchors."""
    ab, ap = torch.nonzero(is_anchor, as_tuple=True)
    ak = anc_keys[ab, ap]
    local_small = ak if ak.numel() <= cap else torch.topk(ak, cap, largest=False).values
    gathered = dist.all_gather_detached(local_small, tag="sdcl")
    if cap == 0:
        keep, n_global = torch.zeros_like(ak, dtype=torch.bool), 0
    elif gathered.numel() >= cap:  # identical decision on every rank
        thr = torch.kthvalue(gathered, cap).values
        keep, n_global = ak <= thr, int((gathered <= thr).sum())
    else:  # no rank was truncated: everybody keeps everything
        keep, n_global = torch.ones_like(ak, dtype=torch.bool), gathered.numel()
    return ab[keep], ap[keep], n_global


def _sdcl_plan_global(y, p, pa, neg_keys, anc_keys, corr, gt_hist, valid, size, num_negatives,
                      max_anchors_per_image, generator, seeds) -> dict:
    """SDCL "global" sampling on metadata (docs/DISTRIBUTED.md, "Budgeted global scopes").

    1. all-reduce of fixed size (257 + 256 counts): global batch size, GT pixels and anchor
       candidates per class -> the classes that keep anchors (same on every rank);
    2. one gather of a few int64 per image: its seed, anchor candidates and GT pixels of each
       of those C classes;
    3. from that metadata and the batch seed, identically on every rank: the anchor cap as
       per-image quotas of a uniform draw of cap anchors, and per class c the per-image quotas
       of a uniform draw of num_negatives class-c pixels of the global batch; within an image
       the quota smallest per-pixel keys (its own generator) are taken.
    Only the C x num_negatives chosen negative rows are then moved (semantic_disentanglement_loss,
    one autograd all-to-all), whatever W is.
    """
    b, dev = y.shape[0], y.device
    anc_hist = torch.bincount(pa[corr], minlength=NUM_IDS)  # (256,)
    local = torch.cat([torch.tensor([b], device=dev), gt_hist.sum(0), anc_hist])
    red = dist.all_reduce_count(local, tag="sdcl", device=dev)
    b_global, gt_global, anc_global = int(red[0]), red[1:257], red[257:]
    class_ok = gt_global >= num_negatives  # (256,) identical on every rank
    is_anchor = corr & class_ok[pa]
    need_cls = torch.nonzero(class_ok & (anc_global > 0)).flatten()  # (C,) same on all ranks

    sizes = dist.gather_sizes(b, tag="sdcl", device=dev)
    offset = sum(sizes[:dist.rank()])
    cols = torch.cat([is_anchor.sum(1, keepdim=True), gt_hist[:, need_cls]], dim=1)  # (B, 1 + C)
    meta, seed = global_meta(cols, seeds, generator, sizes, tag="sdcl")  # (B_global, 1 + C)

    # anchor cap: quotas per image of a uniform draw of `cap` anchors of the global batch
    cap = max_anchors_per_image * b_global
    q_anc = quotas(meta[:, 0], cap, seed, salt=1)
    ab, ap = torch.nonzero(is_anchor, as_tuple=True)
    q_loc = torch.as_tensor(q_anc[offset: offset + b], dtype=torch.long, device=dev)
    keep = keep_smallest(anc_keys[ab, ap], ab, q_loc)
    ab, ap = ab[keep], ap[keep]
    chosen, bank_order, per_rank = _global_negatives(y, valid, neg_keys, need_cls, meta, seed, num_negatives,
                                                     sizes, offset)
    return {"scope": "global", "size": size, "batch": b, "num_negatives": num_negatives,
            "anchors": (ab, ap), "anchor_class": pa[ab, ap],
            "num_anchors_global": int(q_anc.sum()) if cap > 0 else 0,
            "groups": need_cls, "candidates": chosen, "share_sizes": per_rank,
            "bank_order": bank_order}


def _global_negatives(y, valid, neg_keys, need_cls, meta, seed: int, num_negatives: int, sizes: list[int],
                      offset: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per class c, quotas per image of a uniform draw of num_negatives class-c pixels of the global
    batch, then the quota smallest keys in each image -> this rank's chosen pixels in (image, class,
    pixel) order, the order that groups all ranks' rows by class, and each rank's row count."""
    b, n = y.shape
    dev = y.device
    c_n = need_cls.numel()
    q_neg = np.stack([quotas(meta[:, 1 + ci], num_negatives, seed, salt=2 + int(c))
                      for ci, c in enumerate(need_cls.tolist())], 1) if c_n else \
        np.zeros((meta.shape[0], 0), dtype=np.int64)  # (B_global, C)
    slot_of = torch.full((NUM_IDS,), -1, dtype=torch.long, device=dev)
    slot_of[need_cls] = torch.arange(c_n, device=dev)
    yf = y.flatten()
    cand = torch.nonzero((slot_of[yf] >= 0) & valid.flatten()).flatten()
    grp = (cand // n) * c_n + slot_of[yf[cand]]  # (image, class slot)
    quota = torch.as_tensor(q_neg[offset: offset + b].reshape(-1), dtype=torch.long, device=dev)
    chosen = cand[keep_smallest(neg_keys.flatten()[cand], grp, quota)]
    # this rank's rows in (image, class, pixel) order; all ranks' rows concatenate in global
    # (image, class) order, so the class of every shared row is known from q_neg alone
    chosen = chosen[torch.argsort(grp[torch.searchsorted(cand, chosen)] * n + chosen % n)]
    row_cls = np.repeat(np.tile(np.arange(c_n), meta.shape[0]), q_neg.reshape(-1))
    bank_order = torch.as_tensor(np.argsort(row_cls, kind="stable"), dtype=torch.long, device=dev)
    per_rank = [int(q_neg[lo:hi].sum()) for lo, hi in rank_bounds(sizes)]
    return chosen, bank_order, per_rank


def sdcl_pixels(plan: dict) -> torch.Tensor:
    """Flat indices into (B * h * w) of every pixel SDCL reads (anchors: both views; negatives:
    the augmented view; reading the union from both views is a harmless superset)."""
    (ab, ap), n = plan["anchors"], plan["size"][0] * plan["size"][1]
    neg = plan["negatives"].flatten() if plan["scope"] == "image" else plan["candidates"]
    return torch.cat([ab * n + ap, neg])


# ----------------------------------------------------------------------------- the loss

def semantic_disentanglement_loss(emb_aug: torch.Tensor, emb: torch.Tensor,
                                  labels: torch.Tensor, pred: torch.Tensor,
                                  pred_aug: torch.Tensor, *, scope: str = "image",
                                  num_negatives: int = 20, max_anchors_per_image: int = 1000,
                                  tau: float = 0.07, generator: torch.Generator | None = None,
                                  seeds=None, return_details: bool = False, plan=None):
    """SDCL for one level.

    Correction map M = (pred == labels) & (pred_aug != pred) & (labels != 255). For each
    class c that pred_aug predicts at M pixels with at least num_negatives ground-truth
    pixels of c (in the image; "global": in the global batch; classes absent from the
    ground truth are skipped too), anchors = M pixels with pred_aug == c (z_a, with grad),
    positive z(p) detached, negatives = num_negatives random pixels of ground truth c taken
    from z_a WITH gradient, shared by all anchors of c in the image ("global": drawn uniformly
    from the class-c pixels of the whole global batch, only those rows moved, with gradient).
    Cap: more than max_anchors_per_image * B_global anchors -> keep that many at random
    ("image": smallest anchor keys over the global batch; "global": a uniform draw made on the
    per-image anchor counts, see _sdcl_plan_global). Loss = mean over the kept anchors; no
    anchors -> 0 still connected to emb_aug (and emb).
    plan: the result of sdcl_plan for these inputs (then no sampling happens here).
    return_details=True also returns a dict of the sampled indices (for tests).
    """
    check_choice(scope, SCOPES, "loss.contrastive_scope (semantic_disentanglement_loss)")
    check_embeddings(emb_aug, emb, "semantic_disentanglement_loss")
    h, w = emb_aug.shape[-2:]
    n, dev = h * w, emb_aug.device
    if plan is None:
        plan = sdcl_plan(labels, pred, pred_aug, (h, w), scope=scope, num_negatives=num_negatives,
                         max_anchors_per_image=max_anchors_per_image, generator=generator,
                         seeds=seeds)
    elif plan["scope"] != scope or tuple(plan["size"]) != (h, w):
        raise ValueError(f"semantic_disentanglement_loss: the plan is for scope {plan['scope']!r} at "
                         f"{plan['size']}, the call for {scope!r} at {(h, w)}")
    ab, ap = plan["anchors"]
    n_global = plan["num_anchors_global"]
    with torch.autocast(device_type=dev.type, enabled=False):
        dt = math_dtype(emb_aug)
        flat_a = ab * n + ap  # anchors, flat into B*h*w
        anc = take(emb_aug, flat_a, dt) / tau  # (A, D) with grad, scaled: logits come out / tau
        pos = (anc * take(emb.detach(), flat_a, dt)).sum(-1)  # (A,) / tau
        zero = connected_zero(emb_aug, emb)
        if scope == "image":
            local_sum, details = _image_scope(emb_aug, anc, pos, plan, dt)
        else:
            local_sum, details, shared_zero = _global_scope(emb_aug, anc, pos, plan, dt)
            zero = zero + shared_zero  # this rank must run the all-to-all's backward
        loss = dist.global_mean(local_sum, n_global) + zero
    if return_details:
        details.update(anchors=(ab, ap), anchor_class=plan["anchor_class"], num_anchors_global=n_global)
        return loss, details
    return loss


def _image_scope(emb_aug, anc: torch.Tensor, pos: torch.Tensor, plan: dict, dt: torch.dtype
                 ) -> tuple[torch.Tensor, dict]:
    """Each anchor against the num_negatives negatives of its class in its own image -> (sum over
    the local anchors, details)."""
    (ab, _), ac, k = plan["anchors"], plan["anchor_class"], plan["num_negatives"]
    b, dev = emb_aug.shape[0], emb_aug.device
    need, bank_idx = plan["groups"], plan["negatives"]  # (G,), (G, K)
    bank = take(emb_aug, bank_idx, dt)  # (G, K, D) with grad
    slot = torch.searchsorted(need, ab * NUM_IDS + ac)  # (A,) group of each anchor
    bounds = torch.searchsorted(need, torch.arange(b + 1, device=dev) * NUM_IDS).tolist()
    local_sum = anc.new_zeros(())
    for i in torch.unique(ab).tolist():  # per image: (A_i, G_i*K), not (A, G*K)
        a_i = torch.nonzero(ab == i).flatten()
        lo, hi = bounds[i], bounds[i + 1]
        sims = anc[a_i] @ bank[lo:hi].reshape(-1, bank.shape[-1]).T  # (A_i, G_i*K)
        neg = sims.view(a_i.numel(), hi - lo, k)[
            torch.arange(a_i.numel(), device=dev), slot[a_i] - lo]  # (A_i, K)
        local_sum = local_sum + info_nce(pos[a_i], neg).sum()
    return local_sum, {"negatives": bank_idx, "groups": need}


def _global_scope(emb_aug, anc: torch.Tensor, pos: torch.Tensor, plan: dict, dt: torch.dtype
                  ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Each anchor against the num_negatives negatives of its class drawn from the global batch;
    only those C x K rows move (an autograd all-to-all: their gradient returns to the owner, summed
    over every rank's anchors) -> (sum over the local anchors, details, a zero on the shared rows)."""
    (ab, _), k, dev = plan["anchors"], plan["num_negatives"], emb_aug.device
    need_cls, local = plan["groups"], plan["candidates"]
    shared = dist.share_rows(take(emb_aug, local, dt), plan["share_sizes"], tag="sdcl")
    bank = shared[plan["bank_order"]].view(-1, k, shared.shape[-1])  # (C, K, D)
    slot = torch.searchsorted(need_cls, plan["anchor_class"])
    sims = anc @ bank.reshape(-1, bank.shape[-1]).T  # (A, C*K)
    neg = sims.view(ab.numel(), bank.shape[0], k)[
        torch.arange(ab.numel(), device=dev), slot]  # (A, K)
    details = {"negatives": plan["bank_order"].view(-1, k), "groups": need_cls,
               "candidates": local, "share_sizes": plan["share_sizes"]}
    return info_nce(pos, neg).sum(), details, shared.sum() * 0.0
