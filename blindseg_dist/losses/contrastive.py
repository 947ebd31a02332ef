"""Pixel-contrastive losses between the original and the augmented view (docs/METHOD.md, "Losses").

class_wise_contrastive_loss (CWCL) and semantic_disentanglement_loss (SDCL), one decoder
level per call (the caller averages the 3 levels). Embeddings are (B, D, h, w) and
L2-normalized (or PixelRows: the same map given only at the pixels the plan reads); labels / predictions are (B, H, W) class ids (255 = ignore), nearest-resized
to (h, w) when given at another resolution.

Sampling is split-independent (docs/DISTRIBUTED.md, "Sampling"): every random choice is made by
per-pixel random keys drawn from the image's own generator, seeded by
sample_seeds(run_seed, step, global_index); "random k of a set" = the k smallest keys. The
image-scope SDCL anchor cap takes the smallest keys of the union (from each rank's local
smallest). The "global" scopes decide on metadata (docs/DISTRIBUTED.md, "Budgeted global
scopes"): per-image quotas of a uniform k-subset from a hypergeometric draw seeded by the batch
seed (a fold of every image's seed), then the quota smallest keys inside each image. So W ranks
sample exactly what one process samples on the concatenated batch.

Per image, the generator is drawn from in this order (and nothing else):
  CWCL: class-sampling keys rand(N), filler keys rand(N), and only when the image has fewer
        pixels than the filler slots need, randint(N, (need,)) (with replacement);
  SDCL: negative keys rand(N), anchor-cap keys rand(N).
(all float64 on the CPU, then moved to the data's device).

Scopes and the distributed contract: see dist.global_mean and docs/DISTRIBUTED.md. Both losses
return W * (sum over local anchors) / (global anchor count) [global_mean], so that the mean
over ranks is the 1-process loss and DDP's gradient average is the 1-process gradient, on
even and uneven splits (tests/losses/test_dist_scopes.py). "global": only the chosen rows move
(dist.share_rows, an all-to-all of exact sizes): CWCL keys detached, SDCL negatives with
gradient (the backward returns every rank's contribution to the row's owner).
Math runs in float32 (float64 stays float64) with autocast disabled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from blindseg_dist import dist
from blindseg_dist.config import CONTRASTIVE_SCOPES as SCOPES
from blindseg_dist.config import CWCL_NEGATIVES as NEGATIVES
from blindseg_dist.data.labels import IGNORE

_NUM_IDS = IGNORE + 1  # class ids live in [0, IGNORE]; IGNORE (255) is ignore
_PSEUDO_BASE = 256  # CWCL filler groups get ids >= 256 (their own pseudo-class)

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
    if t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host read for both bounds
        if lo < 0 or hi > IGNORE:
            raise ValueError(f"{name} holds ids outside [0, {IGNORE}] (min {lo}, max {hi}); use "
                             f"train ids with {IGNORE} as ignore")
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]  # exact < 2^24
    return t.long().flatten(1)


class PixelRows:
    """An embedding map given only at some pixels: the (P, D) rows at the sorted flat indices
    ``pix`` into B*h*w of a (B, D, h, w) map. The losses accept it wherever they accept the
    dense map, and read only the pixels their plan chose (cwcl_pixels / sdcl_pixels), so no
    zero-filled dense map, and no dense zero gradient, is built (docs/METHOD.md, "Sparse
    projection heads")."""

    def __init__(self, rows: torch.Tensor, pix: torch.Tensor, shape: tuple[int, int, int, int]):
        if rows.dim() != 2 or pix.dim() != 1 or rows.shape[0] != pix.shape[0]:
            raise ValueError(f"PixelRows: rows must be (P, D) and pix (P,), got {tuple(rows.shape)} "
                             f"and {tuple(pix.shape)}")
        self.rows, self.pix = rows, pix
        self.shape = torch.Size(shape)
        if self.shape[1] != rows.shape[1]:
            raise ValueError(f"PixelRows: rows have D={rows.shape[1]}, the map shape says {tuple(shape)}")

    def dim(self) -> int:
        return 4

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def requires_grad(self) -> bool:
        return self.rows.requires_grad

    def detach(self) -> "PixelRows":
        return PixelRows(self.rows.detach(), self.pix, tuple(self.shape))

    def sum(self) -> torch.Tensor:
        return self.rows.sum()

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows at the flat pixel indices ``flat`` (any shape) -> flat.shape + (D,). Every index
        must be one of ``pix`` (the plan's pixels): checked by tests, not per step (a host sync)."""
        return self.rows[torch.searchsorted(self.pix, flat)]


def rows_at(emb, flat: torch.Tensor) -> torch.Tensor:
    """Rows at flat pixel indices into B*h*w -> flat.shape + (C,). ``emb``: a dense (B, C, h, w)
    map (read without a permuted copy) or PixelRows."""
    if isinstance(emb, PixelRows):
        return emb.take(flat)
    n = emb.shape[-2] * emb.shape[-1]
    return emb.flatten(2)[flat // n, :, flat % n]


def _take(emb, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return rows_at(emb, flat).to(dtype)


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


def _info_nce(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-anchor CE with target 0 over the logits [pos, neg...], ALREADY divided by tau (the
    callers scale the (A, D) anchors by 1/tau, not the (A, K) similarities): pos (A,), neg (A, K).
    logsumexp([pos, neg]) = logaddexp(pos, logsumexp(neg)), so no (A, 1 + K) concatenation is
    built; a row of neg that is all -inf (every key masked) gives 0."""
    return torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos


def _connected_zero(emb_aug: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps both embeddings (so every parameter) in the graph: DDP needs no
    find_unused_parameters even when a rank has no anchors."""
    zero = emb_aug.sum() * 0.0  # (a PixelRows sums its rows)
    if emb.requires_grad:
        zero = zero + emb.sum() * 0.0
    return zero


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _check_embeddings(emb_aug, emb, name: str) -> None:
    if emb_aug.dim() != 4 or emb_aug.shape != emb.shape:
        raise ValueError(f"{name}: emb_aug and emb must be (B, D, h, w) of the same shape, got "
                         f"{tuple(emb_aug.shape)} and {tuple(emb.shape)}")


# ----------------------------------------------------------------------------- budgeted global draws

def _fold_seeds(seeds: torch.Tensor) -> int:
    """One int in [0, 2^63) from the per-image seeds of the whole global batch (in order)."""
    h = np.array([0x5EED5C0BE], dtype=np.uint64)
    for s in seeds.cpu().numpy().astype(np.uint64).reshape(-1):
        h = _splitmix64(h ^ s)
    return int(h[0] >> np.uint64(1))


def _global_meta(cols: torch.Tensor, seeds, generator, sizes: list[int], *, tag: str
                 ) -> tuple[np.ndarray, int]:
    """Metadata first (docs/DISTRIBUTED.md, "Budgeted global scopes"): every image's row of
    small integer `cols` (B, k) from every rank, in global image order, and one batch seed.

    The batch seed folds every image's seed (sample_seeds(run seed, step, global index)), so it
    is the same on every rank and for any split; it drives every global choice below. Without
    seeds (one process only) it is drawn from `generator`. One gather of (k + 1) int64 per image.
    """
    b = cols.shape[0]
    if seeds is None:
        if dist.is_distributed():
            raise ValueError("a global contrastive scope on several ranks needs per-image seeds "
                             "(seeds=sample_seeds(run_seed, step, global_indices)): a generator "
                             "cannot make the same choice on every rank")
        g_dev = generator.device if generator is not None else torch.device("cpu")
        s = torch.randint(0, 2 ** 62, (max(b, 1),), generator=generator, device=g_dev)[:b]
    else:
        s = torch.as_tensor(seeds, dtype=torch.int64).flatten()
        if s.numel() != b:
            raise ValueError(f"got {s.numel()} seeds for a batch of {b} images; pass one seed per "
                             "image (sample_seeds(run_seed, step, global_indices))")
    local = torch.cat([s.to(cols.device)[:, None], cols.long()], dim=1)  # (B, 1 + k)
    meta = dist.all_gather_detached(local, tag=tag, sizes=sizes).cpu().numpy()
    return meta[:, 1:], _fold_seeds(torch.from_numpy(meta[:, 0].copy()))


def _quotas(counts: np.ndarray, total: int, seed: int, salt: int) -> np.ndarray:
    """How many of a uniform random `total`-subset of all items fall in each image, given the
    per-image item counts (multivariate hypergeometric draw seeded by (seed, salt): the same
    on every rank). All items when there are no more than `total`."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() <= total:
        return counts
    rng = np.random.default_rng([seed, salt])
    return rng.multivariate_hypergeometric(counts, int(total)).astype(np.int64)


def _keep_smallest(keys: torch.Tensor, group: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Boolean mask: per group g, the quota[g] items of smallest key (a uniform draw given the
    per-pixel random keys); items grouped by (group, key) order in `_rank_in_group`."""
    keep = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
    if keys.numel():
        order, rank = _rank_in_group(keys, group, quota.numel())
        keep[order[rank < quota[group[order]]]] = True
    return keep


def _rank_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    bounds = np.cumsum([0, *sizes])
    return [(int(bounds[q]), int(bounds[q + 1])) for q in range(len(sizes))]


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
                                pixels_per_class: int = 50, global_keys: int = 6000,
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
    the batch seed of _global_meta, so it is split-independent (loss.cwcl_global_keys; the
    default 6000 = the 2 x 4 x 750 keys a 2-GPU run of the reference recipe scored against
    before the budget, docs/DISTRIBUTED.md "Budgeted global scopes").
    plan: the result of cwcl_plan for these inputs (then no sampling happens here).
    """
    _check_choice(negatives, NEGATIVES, "loss.cwcl_negatives (class_wise_contrastive_loss)")
    _check_choice(scope, SCOPES, "loss.contrastive_scope (class_wise_contrastive_loss)")
    _check_embeddings(emb_aug, emb, "class_wise_contrastive_loss")
    if isinstance(global_keys, bool) or not isinstance(global_keys, int) or global_keys < 1:
        raise ValueError(f"loss.cwcl_global_keys must be a positive integer, got {global_keys!r}")
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
        flat = idx + torch.arange(b, device=idx.device)[:, None] * (h * w)  # (B, M) into B*h*w
        anc = _take(emb_aug, flat, dt) / tau  # (B, M, D) with grad, scaled: logits come out / tau
        keys = _take(emb.detach(), flat, dt)  # (B, M, D); key j = anchor j's positive
        pos = (anc * keys).sum(-1)  # (B, M) / tau

        if scope == "image":
            n_global = dist.all_reduce_count([b], tag="cwcl")[0] * m
            neg = anc @ keys.transpose(1, 2)  # (B, M, M)
            if negatives == "paper":
                neg = neg.masked_fill(ids[:, :, None] == ids[:, None, :], float("-inf"))
            local_sum = _info_nce(pos.flatten(), neg.flatten(0, 1)).sum()
        else:
            sizes = dist.gather_sizes(b, tag="cwcl", device=emb_aug.device)
            offset, b_global = sum(sizes[:dist.rank()]), sum(sizes)
            n_global = b_global * m
            _, seed = _global_meta(ids.new_zeros((b, 0)), seeds, generator, sizes, tag="cwcl")
            quota = _quotas(np.full(b_global, m), global_keys, seed, salt=0)  # keys per image
            slots = [np.sort(np.random.default_rng([seed, 1, offset + i]).choice(
                m, int(quota[offset + i]), replace=False)) for i in range(b)]
            img_l = torch.as_tensor(np.repeat(np.arange(b), quota[offset: offset + b]),
                                    dtype=torch.long, device=ids.device)
            slot_l = torch.as_tensor(np.concatenate(slots) if b else np.zeros(0),
                                     dtype=torch.long, device=ids.device)
            own = keys[img_l, slot_l]  # (G_r, D) this rank's chosen keys, detached
            if negatives == "paper":
                # pseudo-class ids unique over the global batch: 256 + global_image * K + slot
                gid = ids[img_l, slot_l]
                gid = torch.where(gid >= _PSEUDO_BASE, gid + (img_l + offset) * max_classes, gid)
                own = torch.cat([own, gid.to(dt)[:, None]], dim=1)  # ids < 2^24: exact in fp32
            per_rank = [int(quota[lo:hi].sum()) for lo, hi in _rank_bounds(sizes)]
            shared = dist.share_rows(own, per_rank, tag="cwcl")  # (G, D [+ 1]) same on all ranks
            all_keys = shared[:, :d]
            local_sum = anc.new_zeros(())
            if negatives == "paper":
                img = torch.arange(offset, offset + b, device=ids.device)[:, None]
                gids = torch.where(ids >= _PSEUDO_BASE, ids + img * max_classes, ids)  # (B, M)
                all_ids = shared[:, d].long()
            for i in range(b):  # per image: bounds memory to (M, G)
                neg = anc[i] @ all_keys.T  # (M, G)
                if negatives == "paper":
                    neg = neg.masked_fill(gids[i][:, None] == all_ids[None, :], float("-inf"))
                local_sum = local_sum + _info_nce(pos[i], neg).sum()
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

    if scope == "global":
        return _sdcl_plan_global(y, p, pa, neg_keys, anc_keys, corr, gt_hist, valid, (h, w),
                                 num_negatives, max_anchors_per_image, generator, seeds)
    b_global = int(dist.all_reduce_count([b], tag="sdcl", device=dev)[0])
    class_ok = gt_hist >= num_negatives  # (B, 256)
    is_anchor = corr & class_ok.gather(1, pa)

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
    return plan


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
    h, w = size
    b, n = y.shape
    dev = y.device
    anc_hist = torch.bincount(pa[corr], minlength=_NUM_IDS)  # (256,)
    local = torch.cat([torch.tensor([b], device=dev), gt_hist.sum(0), anc_hist])
    red = dist.all_reduce_count(local, tag="sdcl", device=dev)
    b_global, gt_global, anc_global = int(red[0]), red[1:257], red[257:]
    class_ok = gt_global >= num_negatives  # (256,) identical on every rank
    is_anchor = corr & class_ok[pa]
    need_cls = torch.nonzero(class_ok & (anc_global > 0)).flatten()  # (C,) same on all ranks
    c_n = need_cls.numel()

    sizes = dist.gather_sizes(b, tag="sdcl", device=dev)
    offset = sum(sizes[:dist.rank()])
    cols = torch.cat([is_anchor.sum(1, keepdim=True), gt_hist[:, need_cls]], dim=1)  # (B, 1 + C)
    meta, seed = _global_meta(cols, seeds, generator, sizes, tag="sdcl")  # (B_global, 1 + C)

    # anchor cap: quotas per image of a uniform draw of `cap` anchors of the global batch
    cap = max_anchors_per_image * b_global
    q_anc = _quotas(meta[:, 0], cap, seed, salt=1)
    ab, ap = torch.nonzero(is_anchor, as_tuple=True)
    q_loc = torch.as_tensor(q_anc[offset: offset + b], dtype=torch.long, device=dev)
    keep = _keep_smallest(anc_keys[ab, ap], ab, q_loc)
    ab, ap = ab[keep], ap[keep]

    # negatives: per class c, quotas per image of a uniform draw of K class-c pixels
    q_neg = np.stack([_quotas(meta[:, 1 + ci], num_negatives, seed, salt=2 + int(c))
                      for ci, c in enumerate(need_cls.tolist())], 1) if c_n else \
        np.zeros((meta.shape[0], 0), dtype=np.int64)  # (B_global, C)
    slot_of = torch.full((_NUM_IDS,), -1, dtype=torch.long, device=dev)
    slot_of[need_cls] = torch.arange(c_n, device=dev)
    yf = y.flatten()
    cand = torch.nonzero((slot_of[yf] >= 0) & valid.flatten()).flatten()
    grp = (cand // n) * c_n + slot_of[yf[cand]]  # (image, class slot)
    quota = torch.as_tensor(q_neg[offset: offset + b].reshape(-1), dtype=torch.long, device=dev)
    chosen = cand[_keep_smallest(neg_keys.flatten()[cand], grp, quota)]
    # this rank's rows in (image, class, pixel) order; all ranks' rows concatenate in global
    # (image, class) order, so the class of every shared row is known from q_neg alone
    chosen = chosen[torch.argsort(grp[torch.searchsorted(cand, chosen)] * n + chosen % n)]
    row_cls = np.repeat(np.tile(np.arange(c_n), meta.shape[0]), q_neg.reshape(-1))
    bank_order = torch.as_tensor(np.argsort(row_cls, kind="stable"), dtype=torch.long, device=dev)
    per_rank = [int(q_neg[lo:hi].sum()) for lo, hi in _rank_bounds(sizes)]
    return {"scope": "global", "size": (h, w), "batch": b, "num_negatives": num_negatives,
            "anchors": (ab, ap), "anchor_class": pa[ab, ap],
            "num_anchors_global": int(q_anc.sum()) if cap > 0 else 0,
            "groups": need_cls, "candidates": chosen, "share_sizes": per_rank,
            "bank_order": bank_order}


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
    from z_a WITH gradient, shared by all anchors of c in the image ("global": drawn uniformly
    from the class-c pixels of the whole global batch, only those rows moved, with gradient).
    Cap: more than max_anchors_per_image * B_global anchors -> keep that many at random
    ("image": smallest anchor keys over the global batch; "global": a uniform draw made on the
    per-image anchor counts, see _sdcl_plan_global). Loss = mean over the kept anchors; no
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
        flat_a = ab * n + ap  # anchors, flat into B*h*w
        anc = _take(emb_aug, flat_a, dt) / tau  # (A, D) with grad, scaled: logits come out / tau
        pos = (anc * _take(emb.detach(), flat_a, dt)).sum(-1)  # (A,) / tau
        zero = _connected_zero(emb_aug, emb)
        if scope == "image":
            need, bank_idx = plan["groups"], plan["negatives"]  # (G,), (G, K)
            bank = _take(emb_aug, bank_idx, dt)  # (G, K, D) with grad
            slot = torch.searchsorted(need, ab * _NUM_IDS + ac)  # (A,) group of each anchor
            bounds = torch.searchsorted(need, torch.arange(b + 1, device=dev) * _NUM_IDS).tolist()
            local_sum = anc.new_zeros(())
            for i in torch.unique(ab).tolist():  # per image: (A_i, G_i*K), not (A, G*K)
                a_i = torch.nonzero(ab == i).flatten()
                lo, hi = bounds[i], bounds[i + 1]
                sims = anc[a_i] @ bank[lo:hi].reshape(-1, bank.shape[-1]).T  # (A_i, G_i*K)
                neg = sims.view(a_i.numel(), hi - lo, num_negatives)[
                    torch.arange(a_i.numel(), device=dev), slot[a_i] - lo]  # (A_i, K)
                local_sum = local_sum + _info_nce(pos[a_i], neg).sum()
            details = {"negatives": bank_idx, "groups": need}
        else:
            need_cls, local = plan["groups"], plan["candidates"]
            # the C x K chosen negatives: only these rows move (autograd all-to-all: their
            # gradient returns to the owner, summed over every rank's anchors)
            shared = dist.share_rows(_take(emb_aug, local, dt), plan["share_sizes"], tag="sdcl")
            bank = shared[plan["bank_order"]].view(-1, num_negatives, shared.shape[-1])  # (C, K, D)
            slot = torch.searchsorted(need_cls, ac)
            sims = anc @ bank.reshape(-1, bank.shape[-1]).T  # (A, C*K)
            neg = sims.view(ab.numel(), bank.shape[0], num_negatives)[
                torch.arange(ab.numel(), device=dev), slot]  # (A, K)
            local_sum = _info_nce(pos, neg).sum()
            zero = zero + shared.sum() * 0.0  # this rank must run the all-to-all's backward
            details = {"negatives": plan["bank_order"].view(-1, num_negatives), "groups": need_cls,
                       "candidates": local, "share_sizes": plan["share_sizes"]}
        loss = dist.global_mean(local_sum, n_global) + zero
    if return_details:
        details.update(anchors=(ab, ap), anchor_class=ac, num_anchors_global=n_global)
        return loss, details
    return loss
