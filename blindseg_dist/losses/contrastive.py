"""Pixel-contrastive losses between the original and the augmented view (docs/METHOD.md, "Losses").

class_wise_contrastive_loss (CWCL) and semantic_disentanglement_loss (SDCL), one decoder
level per call (the caller averages the 3 levels). Embeddings are (B, D, h, w) and
L2-normalized; labels / predictions are (B, H, W) class ids (255 = ignore), nearest-resized
to (h, w) when given at another resolution.

Sampling is split-independent (docs/DISTRIBUTED.md, "Sampling"): every random choice is made by
per-pixel random keys drawn from the image's own generator, seeded by
sample_seeds(run_seed, step, global_index); "random k of a set" = the k smallest keys. A
selection over several images or ranks ("global" negatives, the SDCL anchor cap) takes the
smallest keys of the union, computed from each rank's local smallest. So W ranks sample
exactly what one process samples on the concatenated batch.

Per image, the generator is drawn from in this order (and nothing else):
  CWCL: class-sampling keys rand(N), filler keys rand(N), and only when the image has fewer
        pixels than the filler slots need, randint(N, (need,)) (with replacement);
  SDCL: negative keys rand(N), anchor-cap keys rand(N).
(all float64 on the CPU, then moved to the data's device).

Scopes and the distributed contract: see dist.global_mean and docs/DISTRIBUTED.md. Both losses
return W * (sum over local anchors) / (global anchor count) [global_mean], so that the mean
over ranks is the 1-process loss and DDP's gradient average is the 1-process gradient, on
even and uneven splits (tests/losses/test_dist_scopes.py). Keys gathered from other ranks
are detached (CWCL) or gathered with the autograd all_gather (SDCL negatives carry
gradient: their backward reduce-scatter returns every rank's contribution to the owner).
Math runs in float32 (float64 stays float64) with autocast disabled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from blindseg_dist import dist
from blindseg_dist.data.labels import IGNORE

_NUM_IDS = IGNORE + 1  # class ids live in [0, IGNORE]; IGNORE (255) is ignore
_PSEUDO_BASE = 256  # CWCL filler groups get ids >= 256 (their own pseudo-class)
NEGATIVES = ("reference", "paper")
SCOPES = ("image", "global")

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- seeds / rng

def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_seeds(run_seed: int, step: int, global_indices) -> torch.Tensor:
    """Per-image sampling seeds: a splitmix64 hash of (run seed, step, global sample index).

    Returns an int64 tensor in [0, 2^63) of the shape of `global_indices`. The global index
    is the image's position in the concatenated global batch (rank offset + local index),
    so the seeds, and hence every sampled pixel, do not depend on how the batch is split.
    """
    idx = np.asarray(torch.as_tensor(global_indices, dtype=torch.int64).cpu().numpy())
    h = _splitmix64(np.array([int(run_seed) & _MASK64], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(int(step) & _MASK64))
    h = _splitmix64(h ^ idx.astype(np.uint64))
    return torch.from_numpy((h >> np.uint64(1)).astype(np.int64))


def _image_generators(batch: int, generator: torch.Generator | None,
                      seeds) -> list[torch.Generator | None]:
    """One generator per image: seeds[i] if given, else the shared generator, else default."""
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten().tolist()
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} images; pass one "
                             "seed per image (sample_seeds(run_seed, step, global_indices))")
        return [torch.Generator().manual_seed(s) for s in seeds]
    return [generator] * batch


def _rand(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    g_dev = gen.device if gen is not None else torch.device("cpu")
    return torch.rand(n, generator=gen, dtype=torch.float64, device=g_dev).to(device)


# ----------------------------------------------------------------------------- shared helpers

def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not one of {allowed}")


def _ids_at(t: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    """(B, H, W) class ids -> (B, h*w) int64 at the embedding resolution (nearest)."""
    if t.dim() != 3 or t.is_floating_point():
        raise ValueError(f"{name} must be a (B, H, W) integer tensor of class ids (argmax for "
                         f"predictions), got {tuple(t.shape)} {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > IGNORE):
        raise ValueError(f"{name} holds ids outside [0, {IGNORE}] (min {int(t.min())}, max "
                         f"{int(t.max())}); use train ids with {IGNORE} as ignore")
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]  # exact < 2^24
    return t.long().flatten(1)


def _pixels(emb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return emb.flatten(2).transpose(1, 2).to(dtype)  # (B, D, h, w) -> (B, N, D)


def _rank_in_group(keys: torch.Tensor, group: torch.Tensor, num_groups: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort items by (group, key); return the order and each sorted item's rank in its group."""
    order = torch.argsort(keys)
    order = order[torch.sort(group[order], stable=True).indices]
    g_sorted = group[order]
    counts = torch.bincount(g_sorted, minlength=num_groups)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - start[g_sorted]
    return order, rank


def _info_nce(pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-anchor CE with target 0 over [pos, neg...] / tau. pos (A,), neg (A, K)."""
    logits = torch.cat([pos[:, None], neg], dim=1) / tau  # (A, 1 + K)
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _connected_zero(emb_aug: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps both embeddings (so every parameter) in the graph: DDP needs no
    find_unused_parameters even when a rank has no anchors."""
    zero = emb_aug.sum() * 0.0
    if emb.requires_grad:
        zero = zero + emb.sum() * 0.0
    return zero


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _check_embeddings(emb_aug: torch.Tensor, emb: torch.Tensor, name: str) -> None:
    if emb_aug.dim() != 4 or emb_aug.shape != emb.shape:
        raise ValueError(f"{name}: emb_aug and emb must be (B, D, h, w) of the same shape, got "
                         f"{tuple(emb_aug.shape)} and {tuple(emb.shape)}")


# ----------------------------------------------------------------------------- CWCL

def _sample_image_anchors(y: torch.Tensor, p: torch.Tensor, gen, max_classes: int,
                          per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (K*P,) pixel indices and their class ids (pseudo-classes >= 256)."""
    n, dev = y.numel(), y.device
    keys = _rand(n, gen, dev)
    fill_keys = _rand(n, gen, dev)
    counts = torch.bincount(y[y != IGNORE], minlength=_NUM_IDS)  # (256,)
    cand = torch.nonzero(counts > per_class).flatten()[:max_classes]  # ascending ids
    n_cls = cand.numel()
    slot_of = torch.full((_NUM_IDS,), -1, dtype=torch.long, device=dev)
    slot_of[cand] = torch.arange(n_cls, device=dev)
    pix = torch.nonzero(slot_of[y] >= 0).flatten()  # pixels of candidate classes
    group = slot_of[y[pix]] * 2 + (p[pix] == y[pix]).long()  # 2s: hard, 2s+1: easy
    hist = torch.bincount(group, minlength=2 * n_cls).view(n_cls, 2)
    n_hard, n_easy = hist[:, 0], hist[:, 1]
    # aim P//2 hard + the rest easy; a short set is filled by the other (n_hard + n_easy > P)
    take_hard = torch.minimum(n_hard, torch.clamp(per_class - n_easy, min=per_class // 2))
    take = torch.stack([take_hard, per_class - take_hard], dim=1).flatten()  # (2*n_cls,)
    order, rank = _rank_in_group(keys[pix], group, 2 * n_cls)
    sel = pix[order[rank < take[group[order]]]]  # grouped by slot: hard then easy, by key
    need = (max_classes - n_cls) * per_class
    if need <= n:  # filler groups: disjoint random pixels (any pixel, ignore included)
        fill = torch.argsort(fill_keys)[:need]
    else:  # fewer pixels than filler slots: draw with replacement (documented behaviour)
        g_dev = gen.device if gen is not None else torch.device("cpu")
        fill = torch.randint(n, (need,), generator=gen, device=g_dev).to(dev)
    pseudo = _PSEUDO_BASE + torch.arange(n_cls, max_classes, device=dev)
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
    y = _ids_at(labels, tuple(labels.shape[-2:]), "labels")
    p = _ids_at(pred, tuple(labels.shape[-2:]), "pred")
    gens = _image_generators(b, generator, seeds)
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
    y = _ids_at(labels, size, "labels").view(b, *size)
    p = _ids_at(pred, size, "pred").view(b, *size)
    return sample_class_anchors(y, p, max_classes=max_classes, pixels_per_class=pixels_per_class,
                                generator=generator, seeds=seeds)


def cwcl_pixels(plan: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
    """Flat indices into (B * h * w) of every pixel CWCL reads (same pixels in both views)."""
    idx = plan[0]
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).flatten()


def class_wise_contrastive_loss(emb_aug: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor,
                                pred: torch.Tensor, *, negatives: str = "reference",
                                scope: str = "image", tau: float = 0.07, max_classes: int = 15,
                                pixels_per_class: int = 50,
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
    scope="image": keys of the anchor's own image; "global": keys of every image of every
    rank (plain no-grad gather: keys are detached), anchors stay local.
    plan: the result of cwcl_plan for these inputs (then no sampling happens here).
    """
    _check_choice(negatives, NEGATIVES, "loss.cwcl_negatives (class_wise_contrastive_loss)")
    _check_choice(scope, SCOPES, "loss.contrastive_scope (class_wise_contrastive_loss)")
    _check_embeddings(emb_aug, emb, "class_wise_contrastive_loss")
    b, d, h, w = emb_aug.shape
    if plan is None:
        plan = cwcl_plan(labels, pred, (h, w), max_classes=max_classes,
                         pixels_per_class=pixels_per_class, generator=generator, seeds=seeds)
    idx, ids = plan  # (B, M) each
    m = idx.shape[1]
    if negatives == "reference" and not _any_class_eligible(ids):
        return _connected_zero(emb_aug, emb)
    with torch.autocast(device_type=emb_aug.device.type, enabled=False):
        dt = _math_dtype(emb_aug)
        gi = idx[..., None].expand(-1, -1, d)
        anc = _pixels(emb_aug, dt).gather(1, gi)  # (B, M, D) with grad
        keys = _pixels(emb.detach(), dt).gather(1, gi)  # (B, M, D); key j = anchor j's positive
        pos = (anc * keys).sum(-1)  # (B, M)

        if scope == "image":
            n_global = dist.all_reduce_count([b], tag="cwcl")[0] * m
            neg = anc @ keys.transpose(1, 2)  # (B, M, M)
            if negatives == "paper":
                neg = neg.masked_fill(ids[:, :, None] == ids[:, None, :], float("-inf"))
            local_sum = _info_nce(pos.flatten(), neg.flatten(0, 1), tau).sum()
        else:
            sizes = dist.gather_sizes(b, tag="cwcl", device=emb_aug.device)
            offset, b_global = sum(sizes[:dist.rank()]), sum(sizes)
            n_global = b_global * m
            # pseudo-class ids unique over the global batch: 256 + global_image * K + slot
            img = torch.arange(offset, offset + b, device=ids.device)[:, None]
            gids = torch.where(ids >= _PSEUDO_BASE, ids + img * max_classes, ids)  # (B, M)
            key_sizes = [s * m for s in sizes]
            all_keys = dist.all_gather_detached(keys.reshape(b * m, d), tag="cwcl",
                                                sizes=key_sizes)  # (B_global*M, D)
            all_ids = dist.all_gather_detached(gids.reshape(b * m), tag="cwcl",
                                               sizes=key_sizes)  # (B_global*M,)
            local_sum = anc.new_zeros(())
            for i in range(b):  # per image: bounds memory to (M, B_global*M)
                neg = anc[i] @ all_keys.T  # (M, B_global*M)
                if negatives == "paper":
                    neg = neg.masked_fill(gids[i][:, None] == all_ids[None, :], float("-inf"))
                local_sum = local_sum + _info_nce(pos[i], neg, tau).sum()
        return dist.global_mean(local_sum, n_global) + _connected_zero(emb_aug, emb)


def _any_class_eligible(ids: torch.Tensor) -> bool:
    """The released rule for a level without eligible class: True when some image of the GLOBAL
    batch has a real candidate class (id < 256, more than pixels_per_class pixels). The released
    code decides on its per-GPU batch; deciding on the global batch keeps W ranks equal to one
    process on the concatenated batch (identical for one process). One count all-reduce; every
    rank takes the same branch, so the collectives that follow stay matched."""
    local = int((ids < _PSEUDO_BASE).any(dim=1).sum()) if ids.numel() else 0
    return int(dist.all_reduce_count([local], tag="cwcl", device=ids.device)[0]) > 0


# ----------------------------------------------------------------------------- SDCL

def sdcl_plan(labels: torch.Tensor, pred: torch.Tensor, pred_aug: torch.Tensor,
              size: tuple[int, int], *, scope: str = "image", num_negatives: int = 20,
              max_anchors_per_image: int = 1000, generator: torch.Generator | None = None,
              seeds=None) -> dict:
    """SDCL's sampling at embedding resolution ``size``: anchors, negatives and counts.

    Index math and count collectives only (no embedding is read), so the projection heads can
    be evaluated at sdcl_pixels(plan) alone; semantic_disentanglement_loss(plan=...) then
    gives exactly the dense result.
    """
    _check_choice(scope, SCOPES, "loss.contrastive_scope (semantic_disentanglement_loss)")
    h, w = size
    b = labels.shape[0]
    n, dev = h * w, labels.device
    y = _ids_at(labels, (h, w), "labels")  # (B, N)
    p = _ids_at(pred, (h, w), "pred")
    pa = _ids_at(pred_aug, (h, w), "pred_aug")
    gens = _image_generators(b, generator, seeds)
    draws = [torch.stack([_rand(n, g, dev), _rand(n, g, dev)]) for g in gens]  # (2, N) each
    keys = torch.stack(draws, 1) if draws else torch.zeros(2, 0, n, dtype=torch.float64,
                                                           device=dev)
    neg_keys, anc_keys = keys[0], keys[1]  # (B, N) each: negative choice, anchor cap

    valid = y != IGNORE
    corr = (p == y) & (pa != p) & valid  # correction map M, (B, N)
    img = torch.arange(b, device=dev)[:, None].expand(b, n)
    gt_hist = torch.bincount((img * _NUM_IDS + y)[valid], minlength=b * _NUM_IDS)
    gt_hist = gt_hist.view(b, _NUM_IDS)  # (B, 256) ground-truth pixels per image and class

    if scope == "image":
        b_global = int(dist.all_reduce_count([b], tag="sdcl", device=dev)[0])
        class_ok = gt_hist >= num_negatives  # (B, 256)
        is_anchor = corr & class_ok.gather(1, pa)
    else:
        anc_hist = torch.bincount(pa[corr], minlength=_NUM_IDS)  # (256,)
        local = torch.cat([torch.tensor([b], device=dev), gt_hist.sum(0), anc_hist])
        red = dist.all_reduce_count(local, tag="sdcl", device=dev)
        b_global, gt_global, anc_global = int(red[0]), red[1:257], red[257:]
        class_ok = gt_global >= num_negatives  # (256,) identical on every rank
        is_anchor = corr & class_ok[pa]

    # Anchor cap, split-independent: keep the globally smallest cap anchor keys. Each rank
    # sends its local smallest min(n_local, cap) keys (the global smallest are among them).
    ab, ap = torch.nonzero(is_anchor, as_tuple=True)
    ak = anc_keys[ab, ap]
    cap = max_anchors_per_image * b_global
    local_small = ak if ak.numel() <= cap else torch.topk(ak, cap, largest=False).values
    gathered = dist.all_gather_detached(local_small, tag="sdcl")
    if cap == 0:
        keep, n_global = torch.zeros_like(ak, dtype=torch.bool), 0
    elif gathered.numel() >= cap:  # identical decision on every rank
        thr = torch.kthvalue(gathered, cap).values
        keep, n_global = ak <= thr, int((gathered <= thr).sum())
    else:  # no rank was truncated: everybody keeps everything
        keep, n_global = torch.ones_like(ak, dtype=torch.bool), gathered.numel()
    ab, ap = ab[keep], ap[keep]
    ac = pa[ab, ap]  # (A,) anchor class
    plan = {"scope": scope, "size": (h, w), "batch": b, "num_negatives": num_negatives,
            "anchors": (ab, ap), "anchor_class": ac, "num_anchors_global": n_global}
    if scope == "image":
        # groups (image, class) that keep anchors; 20 smallest negative keys of GT c in b
        need = torch.unique(ab * _NUM_IDS + ac)  # (G,) ascending
        need_mask = torch.zeros(b * _NUM_IDS, dtype=torch.bool, device=dev)
        need_mask[need] = True
        grp = img * _NUM_IDS + y  # (B, N); ignore pixels never needed (class_ok false)
        cand = torch.nonzero(need_mask[grp.flatten()] & valid.flatten()).flatten()
        order, rank = _rank_in_group(neg_keys.flatten()[cand], grp.flatten()[cand],
                                     b * _NUM_IDS)
        plan["negatives"] = cand[order[rank < num_negatives]].view(-1, num_negatives)  # (G, K)
        plan["groups"] = need
    else:
        need_cls = torch.nonzero(class_ok & (anc_global > 0)).flatten()  # same on all ranks
        need_mask = torch.zeros(_NUM_IDS, dtype=torch.bool, device=dev)
        need_mask[need_cls] = True
        yf = y.flatten()
        cand = torch.nonzero(need_mask[yf] & valid.flatten()).flatten()
        order, rank = _rank_in_group(neg_keys.flatten()[cand], yf[cand], _NUM_IDS)
        local = cand[order[rank < num_negatives]]  # local smallest keys per class
        plan["groups"] = need_cls
        plan["candidates"] = local
        plan["candidate_meta"] = torch.stack([neg_keys.flatten()[local], yf[local].double()], dim=1)
    return plan


def sdcl_pixels(plan: dict) -> torch.Tensor:
    """Flat indices into (B * h * w) of every pixel SDCL reads (anchors: both views; negatives:
    the augmented view; reading the union from both views is a harmless superset)."""
    (ab, ap), n = plan["anchors"], plan["size"][0] * plan["size"][1]
    neg = plan["negatives"].flatten() if plan["scope"] == "image" else plan["candidates"]
    return torch.cat([ab * n + ap, neg])


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
    from z_a WITH gradient, shared by all anchors of c in the image ("global": drawn from the
    class-c pixels of the whole global batch, gathered with the autograd all_gather).
    Cap: more than max_anchors_per_image * B_global anchors -> keep that many at random
    (smallest anchor keys over the global batch). Loss = mean over the kept anchors; no
    anchors -> 0 still connected to emb_aug (and emb).
    plan: the result of sdcl_plan for these inputs (then no sampling happens here).
    return_details=True also returns a dict of the sampled indices (for tests).
    """
    _check_choice(scope, SCOPES, "loss.contrastive_scope (semantic_disentanglement_loss)")
    _check_embeddings(emb_aug, emb, "semantic_disentanglement_loss")
    b, d, h, w = emb_aug.shape
    n, dev = h * w, emb_aug.device
    if plan is None:
        plan = sdcl_plan(labels, pred, pred_aug, (h, w), scope=scope, num_negatives=num_negatives,
                         max_anchors_per_image=max_anchors_per_image, generator=generator,
                         seeds=seeds)
    elif plan["scope"] != scope or tuple(plan["size"]) != (h, w):
        raise ValueError(f"semantic_disentanglement_loss: the plan is for scope {plan['scope']!r} at "
                         f"{plan['size']}, the call for {scope!r} at {(h, w)}")
    num_negatives = plan["num_negatives"]
    ab, ap = plan["anchors"]
    ac = plan["anchor_class"]
    n_global = plan["num_anchors_global"]

    with torch.autocast(device_type=dev.type, enabled=False):
        dt = _math_dtype(emb_aug)
        za = _pixels(emb_aug, dt)  # (B, N, D) with grad
        z = _pixels(emb.detach(), dt)  # (B, N, D)
        anc = za[ab, ap]  # (A, D)
        pos = (anc * z[ab, ap]).sum(-1)  # (A,)
        zero = _connected_zero(emb_aug, emb)
        if scope == "image":
            need, bank_idx = plan["groups"], plan["negatives"]  # (G,), (G, K)
            bank = za.reshape(b * n, -1)[bank_idx]  # (G, K, D) with grad
            slot = torch.searchsorted(need, ab * _NUM_IDS + ac)  # (A,) group of each anchor
            bounds = torch.searchsorted(need, torch.arange(b + 1, device=dev) * _NUM_IDS)
            local_sum = anc.new_zeros(())
            for i in torch.unique(ab).tolist():  # per image: (A_i, G_i*K), not (A, G*K)
                a_i = torch.nonzero(ab == i).flatten()
                lo, hi = int(bounds[i]), int(bounds[i + 1])
                sims = anc[a_i] @ bank[lo:hi].reshape(-1, bank.shape[-1]).T  # (A_i, G_i*K)
                neg = sims.view(a_i.numel(), hi - lo, num_negatives)[
                    torch.arange(a_i.numel(), device=dev), slot[a_i] - lo]  # (A_i, K)
                local_sum = local_sum + _info_nce(pos[a_i], neg, tau).sum()
            details = {"negatives": bank_idx, "groups": need}
        else:
            need_cls, local = plan["groups"], plan["candidates"]
            sizes = dist.gather_sizes(local.numel(), tag="sdcl", device=dev)
            # autograd gather: negatives carry gradient back to the rank that owns them
            g_emb = dist.all_gather(za.reshape(b * n, -1)[local], tag="sdcl", sizes=sizes)
            g_meta = dist.all_gather_detached(plan["candidate_meta"], tag="sdcl", sizes=sizes)  # (n_g, 2)
            g_cls = g_meta[:, 1].long()
            order, rank = _rank_in_group(g_meta[:, 0], g_cls, _NUM_IDS)
            pick = order[rank < num_negatives]  # grouped by class ascending: (C*K,)
            bank = g_emb[pick].view(-1, num_negatives, g_emb.shape[-1])  # (C, K, D)
            slot = torch.searchsorted(need_cls, ac)
            sims = anc @ bank.reshape(-1, bank.shape[-1]).T  # (A, C*K)
            neg = sims.view(ab.numel(), bank.shape[0], num_negatives)[
                torch.arange(ab.numel(), device=dev), slot]  # (A, K)
            local_sum = _info_nce(pos, neg, tau).sum()
            zero = zero + g_emb.sum() * 0.0  # this rank must run the gather's backward
            details = {"negatives": pick.view(-1, num_negatives), "groups": need_cls,
                       "candidates": local, "gathered_sizes": sizes}
        loss = dist.global_mean(local_sum, n_global) + zero
    if return_details:
        details.update(anchors=(ab, ap), anchor_class=ac, num_anchors_global=n_global)
        return loss, details
    return loss
