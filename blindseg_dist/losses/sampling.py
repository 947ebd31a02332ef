"""Split-invariant sampling for the pixel-contrastive losses (docs/DISTRIBUTED.md, "Sampling" and
"Budgeted global scopes"): per-image seeds and generators, per-pixel random keys, draws of the k
smallest keys per group, and the metadata-first global draws (per-image quotas from one batch seed).

Every random choice is made by per-pixel random keys drawn from the image's own generator, seeded
by sample_seeds(run_seed, step, global_index); "random k of a set" = the k smallest keys. The
"global" scopes decide on metadata: per-image quotas of a uniform k-subset from a hypergeometric
draw seeded by the batch seed (a fold of every image's seed), then the quota smallest keys inside
each image. So W ranks sample exactly what one process samples on the concatenated batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from blindseg_dist import dist
from blindseg_dist.data.labels import IGNORE

NUM_IDS = IGNORE + 1  # class ids live in [0, IGNORE]; IGNORE (255) is ignore
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- seeds and keys

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


def image_generators(batch: int, generator: torch.Generator | None,
                     seeds) -> list[torch.Generator | None]:
    """One generator per image: seeds[i] if given, else the shared generator, else default."""
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten().tolist()
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} images; pass one "
                             "seed per image (sample_seeds(run_seed, step, global_indices))")
        return [torch.Generator().manual_seed(s) for s in seeds]
    return [generator] * batch


def rand_keys(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n per-pixel random keys in [0, 1), float64, drawn on the generator's device (CPU for none)."""
    g_dev = gen.device if gen is not None else torch.device("cpu")
    return torch.rand(n, generator=gen, dtype=torch.float64, device=g_dev).to(device)


def ids_at(t: torch.Tensor, size: tuple[int, int], name: str, *, check: bool = True) -> torch.Tensor:
    """(B, H, W) class ids -> (B, h*w) int64 at the embedding resolution (nearest). ``check``: read the
    id range back and refuse ids outside [0, 255] (a host read; a caller that batches its reads passes
    False and checks the range itself)."""
    if t.dim() != 3 or t.is_floating_point():
        raise ValueError(f"{name} must be a (B, H, W) integer tensor of class ids (argmax for "
                         f"predictions), got {tuple(t.shape)} {t.dtype}")
    if check and t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host read for both bounds
        if lo < 0 or hi > IGNORE:
            raise ValueError(f"{name} holds ids outside [0, {IGNORE}] (min {lo}, max {hi}); use "
                             f"train ids with {IGNORE} as ignore")
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]  # exact < 2^24
    return t.long().flatten(1)



# ----------------------------------------------------------------------------- draws inside an image

def rank_in_group(keys: torch.Tensor, group: torch.Tensor, num_groups: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort items by (group, key); return the order and each sorted item's rank in its group."""
    order = torch.argsort(keys)
    order = order[torch.sort(group[order], stable=True).indices]
    g_sorted = group[order]
    counts = torch.bincount(g_sorted, minlength=num_groups)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - start[g_sorted]
    return order, rank



# ----------------------------------------------------------------------------- budgeted global draws

def fold_seeds(seeds: torch.Tensor) -> int:
    """One int in [0, 2^63) from the per-image seeds of the whole global batch (in order)."""
    h = np.array([0x5EED5C0BE], dtype=np.uint64)
    for s in seeds.cpu().numpy().astype(np.uint64).reshape(-1):
        h = _splitmix64(h ^ s)
    return int(h[0] >> np.uint64(1))


def global_meta(cols: torch.Tensor, seeds, generator, sizes: list[int], *, tag: str
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
    return meta[:, 1:], fold_seeds(torch.from_numpy(meta[:, 0].copy()))


def quotas(counts: np.ndarray, total: int, seed: int, salt: int) -> np.ndarray:
    """How many of a uniform random `total`-subset of all items fall in each image, given the
    per-image item counts (multivariate hypergeometric draw seeded by (seed, salt): the same
    on every rank). All items when there are no more than `total`."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() <= total:
        return counts
    rng = np.random.default_rng([seed, salt])
    return rng.multivariate_hypergeometric(counts, int(total)).astype(np.int64)


def keep_smallest(keys: torch.Tensor, group: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Boolean mask: per group g, the quota[g] items of smallest key (a uniform draw given the
    per-pixel random keys); items grouped by (group, key) order in `rank_in_group`."""
    keep = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
    if keys.numel():
        order, rank = rank_in_group(keys, group, quota.numel())
        keep[order[rank < quota[group[order]]]] = True
    return keep


def rank_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    bounds = np.cumsum([0, *sizes])
    return [(int(bounds[q]), int(bounds[q + 1])) for q in range(len(sizes))]
