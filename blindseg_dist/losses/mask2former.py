"""Mask2Former's set loss on semantic labels, per image and split-independent (docs/METHOD.md,
"Mask2Former head"; docs/DISTRIBUTED.md, "Mask2Former").

The pieces are transformers' own: ``Mask2FormerHungarianMatcher`` (class, sigmoid-BCE and dice
costs on sampled points, scipy's linear_sum_assignment) and ``Mask2FormerLoss`` (class CE with
the no-object weight, sigmoid BCE and dice on importance-sampled points). What this module
changes is only how they are called:

* Targets: one binary mask per class present in the label (ignore pixels are 0 in every mask), the
  class id as its label: semantic segmentation as a set.
* Per image, locally: the matcher and the mask-loss point sampling run one image at a time,
  inside ``torch.random.fork_rng`` seeded with that image's seed (``sample_seeds`` of the run
  seed, step, decoder layer and the image's index in the global batch). Both draw from
  ``torch.rand`` (the matcher's shared points, the loss's oversampled and random points); seeded
  this way, an image's points depend on nothing but the image, so they are the same whichever
  rank holds it and however the batch is split. The matcher has no collective.
* Normalizers over the global batch (the only communication: one all-reduce of three integers):
  the mask and dice sums are divided by the global number of target masks, the class CE by the
  global no-object-weighted query count (matched queries weigh 1, the others 0.1), through
  ``dist.global_mean``, so W ranks equal one process on the concatenated batch, loss and
  gradients (tests/losses/test_mask2former_dist.py). transformers' own normalizer (the mask count
  averaged over processes, the class CE per process) would make each rank's loss a local mean.

Deep supervision: every decoder layer's prediction (the initial one included) gets its own
matching and the same weights (class 2, mask 5, dice 5); the total is their sum.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from blindseg_dist import dist
from blindseg_dist.data.labels import IGNORE

__all__ = ["Mask2FormerCriterion", "semantic_targets"]


def semantic_targets(label: Tensor, num_classes: int, ignore_index: int = IGNORE) -> tuple[Tensor, Tensor]:
    """(H, W) class ids -> (classes (N,), masks (N, H, W) float): one binary mask per class present
    (ids in [0, num_classes); ``ignore_index`` pixels belong to no mask)."""
    present = torch.unique(label)
    present = present[(present != ignore_index) & (present >= 0) & (present < num_classes)]
    masks = (label[None] == present[:, None, None]).float()
    return present.long(), masks


class _Seeded:
    """``torch.rand`` of ``device`` draws from a stream seeded with ``seed`` inside the block, in
    ``dtype`` (the sampled point coordinates meet the logits in grid_sample); the caller's random
    state and default dtype are restored after it."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.seed, self.device, self.dtype = int(seed), device, dtype

    def __enter__(self):
        self._dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        cuda = self.device.type == "cuda"
        self._fork = torch.random.fork_rng(devices=[self.device] if cuda else [], device_type=self.device.type)
        self._fork.__enter__()
        torch.default_generator.manual_seed(self.seed)
        if cuda:
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        torch.set_default_dtype(self._dtype)
        return self._fork.__exit__(*exc)


class Mask2FormerCriterion:
    """Callable: (class logits per layer, mask logits per layer, labels, seeds per layer) -> terms.

    Not an nn.Module (nothing to train or save); the transformers loss it holds is moved to the
    logits' device and dtype at each call (its no-object class weight is a buffer)."""

    def __init__(self, num_classes: int, *, points: int = 12544, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1) -> None:
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

        cfg = Mask2FormerConfig(num_labels=num_classes, class_weight=class_weight, mask_weight=mask_weight,
                                dice_weight=dice_weight, no_object_weight=no_object_weight, train_num_points=points,
                                oversample_ratio=3.0, importance_sample_ratio=0.75)
        self.num_classes = num_classes
        self.weights = {"class": class_weight, "mask": mask_weight, "dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.hf = Mask2FormerLoss(cfg, weight_dict={"loss_cross_entropy": class_weight, "loss_mask": mask_weight,
                                                    "loss_dice": dice_weight})

    def __call__(self, class_logits: Sequence[Tensor], mask_logits: Sequence[Tensor], label: Tensor,
                 seeds: Tensor) -> dict[str, Tensor]:
        """``class_logits`` [(B, Q, K + 1)] and ``mask_logits`` [(B, Q, h, w)], one per decoder layer;
        ``label`` (B, H, W); ``seeds`` (layers, B) int64. Returns {"total": weighted sum over layers,
        "class", "mask", "dice": the last layer's unweighted terms}; each term is this rank's
        share (see the module doc: mean over ranks = the 1-process value)."""
        if len(class_logits) != len(mask_logits) or seeds.shape != (len(class_logits), label.shape[0]):
            raise ValueError(f"Mask2FormerCriterion: {len(class_logits)} class / {len(mask_logits)} mask layers "
                             f"and seeds {tuple(seeds.shape)} for a batch of {label.shape[0]}")
        # float32 at least (half logits), float64 stays float64 (as losses/segmentation.py)
        class_logits = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in class_logits]
        mask_logits = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in mask_logits]
        ref = mask_logits[-1]
        self.hf.to(device=ref.device, dtype=ref.dtype)
        b, q = class_logits[-1].shape[:2]
        targets = [semantic_targets(label[i], self.num_classes) for i in range(b)]
        classes = [c for c, _ in targets]
        masks = [m.to(ref.dtype) for _, m in targets]
        n_masks = sum(len(c) for c in classes)
        matched = sum(min(q, len(c)) for c in classes)
        glob = dist.all_reduce_count([n_masks, matched, b * q - matched], tag="m2f", device=ref.device).tolist()
        mask_count = glob[0]
        class_weight_sum = glob[1] + self.no_object_weight * glob[2]
        local_weight_sum = matched + self.no_object_weight * (b * q - matched)
        total = ref.new_zeros(())
        terms: dict[str, Tensor] = {}
        for layer, (cls, msk) in enumerate(zip(class_logits, mask_logits)):
            indices, mask_sum, dice_sum = [], msk.sum() * 0.0, msk.sum() * 0.0
            for i in range(b):
                with _Seeded(int(seeds[layer, i]), msk.device, msk.dtype):
                    idx = self.hf.matcher(msk[i:i + 1], cls[i:i + 1], [masks[i]], [classes[i]])
                    if len(idx[0][0]):
                        part = self.hf.loss_masks(msk[i:i + 1], [masks[i]], idx, 1)  # sums (normalizer 1)
                        mask_sum = mask_sum + part["loss_mask"]
                        dice_sum = dice_sum + part["loss_dice"]
                indices.append(idx[0])
            # the weighted mean over this rank's B x Q queries, back to its sum
            ce_sum = self.hf.loss_labels(cls, classes, indices)["loss_cross_entropy"] * local_weight_sum
            layer_terms = {"class": dist.global_mean(ce_sum, class_weight_sum),
                           "mask": dist.global_mean(mask_sum, mask_count),
                           "dice": dist.global_mean(dice_sum, mask_count)}
            total = total + sum(self.weights[k] * v for k, v in layer_terms.items())
            terms = layer_terms
        return {"total": total, **terms}
