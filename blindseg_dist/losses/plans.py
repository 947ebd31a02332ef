"""Sampling plans made in the loader (docs/GPU_STEP.md, "Sampling plans").

Most of CWCL's sampling depends on the labels and the per-image seeds alone: the candidate
classes, the key order of their pixels, the filler groups and every class id. ``LoaderPlanner``
computes that part per sample in the loader workers, at each projection level's label resolution,
with the seeds and the generator draws of ``cwcl_plan`` (same generator, same order of draws),
and the batch carries it as fixed-size padded tensors plus counts. On the device,
``cwcl_plan_from_loader`` finishes the plan with the one thing that needs the prediction (which
pixels are hard, which easy) by fixed-shape tensor ops only: no host read, no data-dependent
shape. The result equals ``cwcl_plan`` on the same labels, predictions and seeds, element for
element (tests/losses/test_plans.py, on real loader batches).

Per sample and level j (N = h * w pixels at the level, K = max_classes, P = pixels_per_class):
- ``pix`` (N,) int32: the pixels of the candidate classes, sorted by (class slot, key); padded with 0;
- ``slot`` (N,) int32: their class slot, K for the padding;
- ``cls`` (K,) int64: the class id of each slot (255 for an unused slot);
- ``base`` (K*P,) int64: the plan's pixel indices with the filler groups in place (positions from
  n_cls * P on) and 0 where the device puts the class pixels;
- ``ids`` (K*P,) int64: the plan's class ids (real ids, then the filler pseudo-classes);
- ``ncls`` () int64: the number of candidate classes.

SDCL's anchors depend on both predictions, so only its per-pixel random keys (seed-only) are drawn
in the loader: ``sdcl_keys`` per level, (2, N) float64 per sample (negative choice, anchor cap),
from the image's SDCL generator in sdcl_plan's order.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blindseg_dist.data.labels import IGNORE
from blindseg_dist.losses.cwcl import PSEUDO_BASE
from blindseg_dist.losses.sampling import NUM_IDS, sample_seeds

PLAN_KEY = "cwcl_plans"  # the batch's list of per-level plans
SDCL_KEY = "sdcl_keys"  # the batch's list of per-level SDCL pixel keys (B, 2, N)
STEP_KEY = "plan_step"  # the micro-batch index the plans were made for


def stream_seed(run_seed: int, name: str, level: int) -> int:
    """A distinct sampling seed per (run, loss term, level), stable across processes."""
    return (run_seed * 1_000_003 + zlib.crc32(f"{name}:{level}".encode())) % (2**62)


def level_ids(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) class ids -> (..., h*w) int64, nearest-resized as the losses resize them."""
    lead = label.shape[:-2]
    t = label.reshape(-1, *label.shape[-2:])
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0]  # exact < 2^24
    return t.long().reshape(*lead, -1)


def cwcl_label_plan(y: torch.Tensor, seed: int, *, max_classes: int = 15, per_class: int = 50) -> dict:
    """The label-only part of CWCL's sampling for one image: ``y`` (N,) int64 ids at the level's
    resolution, ``seed`` the image's sampling seed. Draws the image's generator exactly as
    cwcl_plan does (class keys rand(N), filler keys rand(N), then randint only when needed)."""
    n, k, p = y.numel(), max_classes, per_class
    gen = torch.Generator().manual_seed(int(seed))
    keys = torch.rand(n, generator=gen, dtype=torch.float64)
    fill_keys = torch.rand(n, generator=gen, dtype=torch.float64)
    counts = torch.bincount(y[y != IGNORE], minlength=NUM_IDS)
    cand = torch.nonzero(counts > p).flatten()[:k]  # ascending ids
    n_cls = cand.numel()
    slot_of = torch.full((NUM_IDS,), -1, dtype=torch.long)
    slot_of[cand] = torch.arange(n_cls)
    pix = torch.nonzero(slot_of[y] >= 0).flatten()
    order = torch.argsort(keys[pix])
    order = order[torch.sort(slot_of[y[pix[order]]], stable=True).indices]  # by (slot, key)
    pix = pix[order]
    out_pix = torch.zeros(n, dtype=torch.int32)
    out_slot = torch.full((n,), k, dtype=torch.int32)
    out_pix[: pix.numel()] = pix.to(torch.int32)
    out_slot[: pix.numel()] = slot_of[y[pix]].to(torch.int32)
    need = (k - n_cls) * p
    if need <= n:
        fill = torch.argsort(fill_keys)[:need]
    else:  # fewer pixels than filler slots: with replacement, as cwcl_plan
        fill = torch.randint(n, (need,), generator=gen)
    base = torch.zeros(k * p, dtype=torch.long)
    base[n_cls * p:] = fill
    cls = torch.full((k,), IGNORE, dtype=torch.long)
    cls[:n_cls] = cand
    pseudo = PSEUDO_BASE + torch.arange(n_cls, k)
    ids = torch.cat([cand.repeat_interleave(p), pseudo.repeat_interleave(p)])
    return {"pix": out_pix, "slot": out_slot, "cls": cls, "base": base, "ids": ids,
            "ncls": torch.tensor(n_cls, dtype=torch.long)}


@dataclass(frozen=True)
class LoaderPlanner:
    """Adds the CWCL plans of every level to a batch in the loader worker (picklable: the
    DataLoader sends it to its workers). ``sizes``: each projection level's (h, w) for the crop;
    the seeds are the objective's: sample_seeds(stream_seed(run_seed, "cwcl", j), k, global index)
    for micro-batch k, global index k * batch_size * world + rank * batch_size + i."""

    run_seed: int
    sizes: tuple[tuple[int, int], ...]
    batch_size: int
    rank: int = 0
    world: int = 1
    max_classes: int = 15
    per_class: int = 50
    cwcl: bool = True  # CWCL's plans
    sdcl_keys: bool = False  # SDCL's per-pixel keys (sdcl_plan(keys=...))

    def __call__(self, batch: dict, step: int) -> dict:
        label = batch["label"]
        b = label.shape[0]
        gidx = step * self.batch_size * self.world + self.rank * b + torch.arange(b)
        plans = []
        for j, size in enumerate(self.sizes if self.cwcl else ()):
            y = level_ids(label, size)  # (B, N)
            seeds = sample_seeds(stream_seed(self.run_seed, "cwcl", j), step, gidx).tolist()
            per = [cwcl_label_plan(y[i], seeds[i], max_classes=self.max_classes, per_class=self.per_class)
                   for i in range(b)]
            plans.append({name: torch.stack([q[name] for q in per]) for name in per[0]})
        if self.cwcl:
            batch[PLAN_KEY] = plans
        if self.sdcl_keys:
            batch[SDCL_KEY] = [sdcl_keys(sample_seeds(stream_seed(self.run_seed, "sdcl", j), step, gidx).tolist(),
                                         size[0] * size[1]) for j, size in enumerate(self.sizes)]
        batch[STEP_KEY] = torch.tensor(step, dtype=torch.long)
        return batch


def sdcl_keys(seeds: list[int], n: int) -> torch.Tensor:
    """SDCL's per-pixel keys of each image, (B, 2, N) float64: rand(N) twice from the image's
    generator, as sdcl_plan draws them (negative choice, then anchor cap)."""
    out = torch.empty(len(seeds), 2, n, dtype=torch.float64)
    for i, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(s))
        out[i, 0] = torch.rand(n, generator=gen, dtype=torch.float64)
        out[i, 1] = torch.rand(n, generator=gen, dtype=torch.float64)
    return out


def cwcl_plan_from_loader(plan: dict, pred: torch.Tensor, size: tuple[int, int], *,
                          per_class: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish a loader plan on the device: ``plan`` one level's tensors (B, ...) on the device,
    ``pred`` (B, H, W) predicted ids. Returns (index, class_id), both (B, K*P), equal to
    cwcl_plan's. Fixed shapes only: the hard / easy split per class slot, each set's rank in key
    order by cumulative sums, and one scatter of the selected pixels to their places."""
    pix, slot, cls = plan["pix"].long(), plan["slot"].long(), plan["cls"]
    b, n = pix.shape
    k, p = cls.shape[1], per_class
    pr = level_ids(pred, size)  # (B, N)
    valid = slot < k
    cls_pad = torch.cat([cls, cls.new_full((b, 1), -1)], dim=1)  # (B, K + 1): the padding slot
    easy = (pr.gather(1, pix) == cls_pad.gather(1, slot)) & valid
    hard = valid & ~easy
    zeros = torch.zeros(b, k + 1, dtype=torch.long, device=pix.device)
    n_hard = zeros.scatter_add(1, slot, hard.long())
    n_easy = zeros.scatter_add(1, slot, easy.long())
    take_hard = torch.minimum(n_hard, torch.clamp(p - n_easy, min=p // 2))  # as cwcl_plan
    # rank of each pixel among its slot's hard (easy) pixels in key order: the pixels are sorted
    # by (slot, key), so it is the count of earlier hard (easy) pixels minus those of earlier slots
    before_h = torch.cumsum(hard.long(), 1) - hard.long()
    before_e = torch.cumsum(easy.long(), 1) - easy.long()
    slot_h = (torch.cumsum(n_hard, 1) - n_hard).gather(1, slot)
    slot_e = (torch.cumsum(n_easy, 1) - n_easy).gather(1, slot)
    rank_h, rank_e = before_h - slot_h, before_e - slot_e
    th = take_hard.gather(1, slot)
    sel_h = hard & (rank_h < th)
    sel_e = easy & (rank_e < p - th)
    # the class pixels go to slot * P + (hard: rank; easy: take_hard + rank), in (slot, hard then
    # easy, key) order as cwcl_plan; the others to a spare column that is dropped
    pos = torch.where(sel_h, slot * p + rank_h, torch.where(sel_e, slot * p + th + rank_e, k * p))
    out = torch.cat([plan["base"], plan["base"].new_zeros(b, 1)], dim=1)
    out = out.scatter(1, pos, pix)[:, : k * p]
    return out, plan["ids"]
