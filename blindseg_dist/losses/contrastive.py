"""Pixel-contrastive losses between the original and the augmented view (docs/METHOD.md, "Losses").

The code lives by concern: losses/sampling.py (seeds, per-pixel keys, quotas, the split-invariant
draws), losses/cwcl.py and losses/sdcl.py (each loss with its plan, one helper per scope), and
losses/pixels.py (PixelRows and the InfoNCE pieces both share). This module names them together.

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

Scopes and the distributed contract: see dist.global_mean and docs/DISTRIBUTED.md. Both losses
return W * (sum over local anchors) / (global anchor count) [global_mean], so that the mean
over ranks is the 1-process loss and DDP's gradient average is the 1-process gradient, on
even and uneven splits (tests/losses/test_dist_scopes.py). "global": only the chosen rows move
(dist.share_rows, an all-to-all of exact sizes): CWCL keys detached, SDCL negatives with
gradient (the backward returns every rank's contribution to the row's owner).
Math runs in float32 (float64 stays float64) with autocast disabled.
"""

from blindseg_dist.losses.cwcl import (NEGATIVES, class_wise_contrastive_loss, cwcl_pixels, cwcl_plan,
                                      sample_class_anchors)
from blindseg_dist.losses.pixels import PixelRows, rows_at
from blindseg_dist.losses.sampling import fold_seeds as _fold_seeds  # noqa: F401 - the tests' names
from blindseg_dist.losses.sampling import quotas as _quotas  # noqa: F401
from blindseg_dist.losses.sampling import sample_seeds
from blindseg_dist.losses.sdcl import SCOPES, sdcl_pixels, sdcl_plan, semantic_disentanglement_loss

__all__ = ["NEGATIVES", "SCOPES", "PixelRows", "class_wise_contrastive_loss", "cwcl_pixels", "cwcl_plan", "rows_at",
           "sample_class_anchors", "sample_seeds", "sdcl_pixels", "sdcl_plan", "semantic_disentanglement_loss"]
