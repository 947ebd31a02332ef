"""Semantic disentanglement contrastive loss (SDCL) for one decoder level (docs/METHOD.md, "Losses"):
its sampling (anchors on the correction map, the anchor cap, per-class negatives; sdcl_plan) and the
loss in its two scopes ("image": negatives of the anchor's own image; "global": negatives drawn from
the whole global batch, only those rows moved, with gradient).

Per image, the generator is drawn from in this order (and nothing else): negative keys rand(N),
anchor-cap keys rand(N); all float64 on the CPU, then moved to the data's device.

The "image" scope samples every level of a step at once (sdcl_image_plans) with fixed-shape tensor
ops and ONE read of a few counts by the host (two on several ranks: the anchor cap's key exchange
needs each rank's anchor count first); the draws are the ones of the per-level description above,
element for element (docs/GPU_STEP.md, "Host synchronisations").
"""

from __future__ import annotations

import numpy as np
import torch

from blindseg_dist import dist
from blindseg_dist.config import CONTRASTIVE_SCOPES as SCOPES
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.losses.pixels import check_choice, check_embeddings, connected_zero, info_nce, math_dtype, take
from blindseg_dist.losses.sampling import (NUM_IDS, global_meta, ids_at, image_generators, keep_smallest, quotas,
                                           rand_keys, rank_bounds)


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
    if scope == "image":
        return sdcl_image_plans(labels, pred, pred_aug, [size], num_negatives=num_negatives,
                                max_anchors_per_image=max_anchors_per_image, generator=generator,
                                seeds=[seeds], keys=[keys])[0]
    h, w = size
    b = labels.shape[0]
    n, dev = h * w, labels.device
    y = ids_at(labels, (h, w), "labels")  # (B, N)
    p = ids_at(pred, (h, w), "pred")
    pa = ids_at(pred_aug, (h, w), "pred_aug")
    neg_keys, anc_keys = _level_keys(keys, b, n, dev, generator, seeds)  # (B, N) each
    valid = y != IGNORE
    corr = (p == y) & (pa != p) & valid  # correction map M, (B, N)
    img = torch.arange(b, device=dev)[:, None].expand(b, n)
    gt_hist = torch.bincount((img * NUM_IDS + y)[valid], minlength=b * NUM_IDS)
    gt_hist = gt_hist.view(b, NUM_IDS)  # (B, 256) ground-truth pixels per image and class
    return _sdcl_plan_global(y, p, pa, neg_keys, anc_keys, corr, gt_hist, valid, (h, w),
                             num_negatives, max_anchors_per_image, generator, seeds)


def _level_keys(keys, b: int, n: int, dev: torch.device, generator, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """The level's (negative-choice, anchor-cap) keys, (B, N) each: the loader's ``keys`` (B, 2, N) when
    given, else drawn here from the images' generators."""
    if keys is None:
        return _pixel_keys(b, n, dev, generator, seeds)
    if tuple(keys.shape) != (b, 2, n):
        raise ValueError(f"sdcl_plan: keys must be (B, 2, N) = {(b, 2, n)}, got {tuple(keys.shape)}")
    return keys[:, 0], keys[:, 1]


def _pixel_keys(b: int, n: int, dev: torch.device, generator, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, from its own generator: negative-choice keys, then anchor-cap keys -> (B, N) each."""
    gens = image_generators(b, generator, seeds)
    draws = [torch.stack([rand_keys(n, g, dev), rand_keys(n, g, dev)]) for g in gens]  # (2, N) each
    keys = torch.stack(draws, 1) if draws else torch.zeros(2, 0, n, dtype=torch.float64,
                                                           device=dev)
    return keys[0], keys[1]


def sdcl_image_plans(labels: torch.Tensor, pred: torch.Tensor, pred_aug: torch.Tensor,
                     sizes: list[tuple[int, int]], *, num_negatives: int = 20, max_anchors_per_image: int = 1000,
                     generator: torch.Generator | None = None, seeds=None, keys=None) -> list[dict]:
    """SDCL "image" sampling of several levels (one plan per size in ``sizes``), each equal to what the
    per-level description in sdcl_plan draws: classes with num_negatives ground-truth pixels in the image
    keep their anchors; the anchor cap keeps the max_anchors_per_image * B_global smallest anchor keys of
    the global batch; per (image, class) that keeps anchors, the negatives are the num_negatives smallest
    negative keys among the image's ground-truth pixels of that class.

    Built for a GPU: masks, histograms, the cap's threshold and the per-group ranks are fixed-shape
    tensor ops; the host reads ONE small tensor for all levels (anchor and group counts, the id ranges
    that ids_at would check), which sizes the index tensors (nonzero_static). On several ranks the cap
    first needs every rank's anchor count (one more read): each rank then sends its smallest
    min(n_r, cap) keys, as before. ``seeds`` and ``keys``: per level (a list), as in sdcl_plan.
    """
    b, dev, k = labels.shape[0], labels.device, num_negatives
    seeds = list(seeds) if seeds is not None else [None] * len(sizes)
    keys = list(keys) if keys is not None else [None] * len(sizes)
    levels = [_level_state(labels, pred, pred_aug, size, k, generator, lvl_seeds, lvl_keys)
              for size, lvl_seeds, lvl_keys in zip(sizes, seeds, keys)]
    bounds = [torch.stack(torch.aminmax(t)) if t.numel() else torch.zeros(2, dtype=t.dtype, device=dev)
              for t in (labels, pred, pred_aug)]
    if dist.is_distributed():
        _cap_thresholds_distributed(levels, b, max_anchors_per_image, dev)
    else:
        for lv in levels:
            cap = max_anchors_per_image * b
            lv["keep"] = _keep_below(lv, cap, torch.kthvalue(lv["ak"], cap).values if 0 < cap < lv["ak"].numel()
                                     else None)
            lv["n_global"] = lv["keep"].sum()
    img = torch.arange(b, device=dev)[:, None]
    counts = []
    for lv in levels:
        lv["need_mask"] = torch.zeros(b * NUM_IDS, dtype=torch.long, device=dev).index_add_(
            0, (img * NUM_IDS + lv["pa"]).flatten(), lv["keep"].flatten().long()) > 0  # groups keeping anchors
        n_global = lv["n_global"]
        if not torch.is_tensor(n_global):
            n_global = torch.full((), n_global, dtype=torch.long, device=dev)
        counts += [lv["keep"].sum(), lv["need_mask"].sum(), n_global]
    read = torch.cat([torch.stack(counts).long(), torch.cat(bounds).long()]).tolist()  # the host read
    for (lo, hi), name in zip(zip(read[-6::2], read[-5::2]), ("labels", "pred", "pred_aug")):
        if lo < 0 or hi > IGNORE:
            raise ValueError(f"{name} holds ids outside [0, {IGNORE}] (min {lo}, max {hi}); use "
                             f"train ids with {IGNORE} as ignore")
    plans = []
    for j, lv in enumerate(levels):
        n_keep, n_groups, n_global = read[3 * j: 3 * j + 3]
        n = lv["size"][0] * lv["size"][1]
        flat_a = _true_indices(lv["keep"].flatten(), n_keep)  # (b, pixel) order
        need = _true_indices(lv["need_mask"], n_groups)  # ascending (image, class)
        plans.append({"scope": "image", "size": lv["size"], "batch": b, "num_negatives": k,
                      "anchors": (flat_a // n, flat_a % n), "anchor_class": lv["pa"].flatten()[flat_a],
                      "num_anchors_global": n_global, "groups": need,
                      "negatives": _group_negatives(lv, need, b, k)})
    return plans


def _level_state(labels, pred, pred_aug, size, k, generator, seeds, keys) -> dict:
    """One level's fixed-shape sampling state: ids at the level, keys, correction map, anchors (before
    the cap) and their cap keys (+inf elsewhere). Ids are clamped into [0, 255] so that nothing here
    fails on a bad id; the caller checks their range with its one host read."""
    (h, w), b, dev = size, labels.shape[0], labels.device
    n = h * w
    y, p, pa = (ids_at(t, (h, w), name, check=False).clamp(0, IGNORE)
                for t, name in ((labels, "labels"), (pred, "pred"), (pred_aug, "pred_aug")))
    neg_keys, anc_keys = _level_keys(keys, b, n, dev, generator, seeds)
    valid = y != IGNORE
    corr = (p == y) & (pa != p) & valid  # correction map M, (B, N)
    grp = (torch.arange(b, device=dev)[:, None] * NUM_IDS + y).flatten()  # (B*N,) (image, GT class)
    gt_hist = torch.zeros(b * NUM_IDS, dtype=torch.long, device=dev).index_add_(
        0, grp, valid.flatten().long()).view(b, NUM_IDS)  # GT pixels per image and class
    is_anchor = corr & (gt_hist >= k).gather(1, pa)
    return {"size": (h, w), "pa": pa, "valid": valid, "grp": grp, "neg_keys": neg_keys,
            "is_anchor": is_anchor, "ak": torch.where(is_anchor, anc_keys, torch.inf).flatten()}


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The ascending indices of the ``count`` True entries of a 1-d mask, with ``count`` known on the host:
    ``nonzero_static`` (no read of its own); PyTorch builds without its CUDA kernel (before 2.6) take a
    stable sort instead (the same indices)."""
    try:
        return torch.nonzero_static(mask, size=count).flatten()
    except NotImplementedError:
        return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


def _keep_below(lv: dict, cap: int, thr: torch.Tensor | None) -> torch.Tensor:
    """The kept anchors (B, N): those of key <= thr (thr None: all of them; cap 0: none)."""
    if cap == 0:
        return torch.zeros_like(lv["is_anchor"])
    if thr is None:
        return lv["is_anchor"]
    return lv["is_anchor"] & (lv["ak"] <= thr).view_as(lv["is_anchor"])


def _cap_thresholds_distributed(levels: list[dict], b: int, max_anchors_per_image: int,
                                dev: torch.device) -> None:
    """The anchor cap over the global batch (every level): keep the globally smallest cap keys. One
    gather of (B, anchors per level) per rank, read by the host, sizes the exchange of each rank's
    local smallest min(n_r, cap) keys (the global smallest are among them); the cap's threshold is
    then the cap-th smallest gathered key, the same on every rank."""
    local = torch.stack([torch.full((), b, dtype=torch.long, device=dev)]
                        + [lv["is_anchor"].sum() for lv in levels])
    rows = dist.all_gather_detached(local[None], tag="sdcl", sizes=[1] * dist.world_size()).tolist()
    cap = max_anchors_per_image * sum(r[0] for r in rows)
    for j, lv in enumerate(levels):
        send = [min(r[1 + j], cap) for r in rows]
        mine = send[dist.rank()]
        local_small = torch.topk(lv["ak"], mine, largest=False).values  # finite: mine <= n_r
        gathered = dist.all_gather_detached(local_small, tag="sdcl", sizes=send)
        if cap > 0 and sum(send) >= cap:  # identical decision on every rank
            thr = torch.kthvalue(gathered, cap).values
            lv["keep"], lv["n_global"] = _keep_below(lv, cap, thr), (gathered <= thr).sum()
        else:  # no rank was truncated (or cap 0): everybody keeps everything (nothing)
            lv["keep"], lv["n_global"] = _keep_below(lv, cap, None), sum(send)


def _group_negatives(lv: dict, need: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """(G, K) flat pixel indices: per group of ``need`` (ascending image * 256 + class), the k ground-truth
    pixels of that class in that image with the smallest negative keys, in key order. Every pixel is
    ranked in its group with two sorts (key, then stable by group) and written to a (groups, k) table;
    pixels outside the needed groups rank in one spare group."""
    n_all = lv["grp"].numel()
    dev = lv["grp"].device
    spare = b * NUM_IDS
    need_mask = torch.zeros(spare + 1, dtype=torch.bool, device=dev)
    need_mask[need] = True
    gkey = torch.where(need_mask[lv["grp"]] & lv["valid"].flatten(), lv["grp"], spare)
    order = torch.argsort(lv["neg_keys"].flatten())
    order = order[torch.sort(gkey[order], stable=True).indices]  # by (group, key)
    g_sorted = gkey[order]
    rank = torch.arange(n_all, device=dev) - torch.searchsorted(g_sorted, g_sorted)
    table = torch.zeros(spare + 1, k + 1, dtype=torch.long, device=dev)
    table[g_sorted, rank.clamp(max=k)] = order  # column k collects the ranks >= k (dropped)
    return table[need, :k]


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
    the local anchors, details). Fixed shapes, no loop over images: the anchor's group bank is gathered
    ((A, K, D)), or, when the batch holds fewer groups than the embedding has channels, every anchor is
    scored against every group's negatives ((A, G*K), the cheaper product) and its own are picked."""
    (ab, _), ac, k = plan["anchors"], plan["anchor_class"], plan["num_negatives"]
    need, bank_idx = plan["groups"], plan["negatives"]  # (G,), (G, K)
    bank = take(emb_aug, bank_idx, dt)  # (G, K, D) with grad
    slot = torch.searchsorted(need, ab * NUM_IDS + ac)  # (A,) group of each anchor
    g, d = bank.shape[0], bank.shape[-1]
    if g < d:
        sims = (anc @ bank.reshape(-1, d).T).view(anc.shape[0], g, k)  # (A, G, K)
        neg = sims[torch.arange(anc.shape[0], device=anc.device), slot]  # (A, K)
    else:
        neg = torch.bmm(bank[slot], anc[:, :, None])[..., 0]  # (A, K)
    return info_nce(pos, neg).sum(), {"negatives": bank_idx, "groups": need}


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
