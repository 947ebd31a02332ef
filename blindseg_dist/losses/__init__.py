"""BlindNet losses (docs/METHOD.md, "Losses") with their distributed scopes
(docs/DISTRIBUTED.md, "Loss scopes").

Every loss returns, on each of W ranks, a value whose mean over ranks equals the 1-process
loss on the concatenated global batch, with gradients that DDP's averaging turns into the
1-process gradients (see blindseg_dist.dist.global_mean).

Modules: segmentation (CE), covariance (the covariance losses), cwcl and sdcl (the contrastive
losses, each with its sampling plan), sampling (seeds, keys, split-invariant draws), pixels (what
the contrastive losses share); contrastive names the contrastive API together.
"""

from blindseg_dist.losses.cwcl import class_wise_contrastive_loss, cwcl_pixels, cwcl_plan, sample_class_anchors
from blindseg_dist.losses.pixels import PixelRows
from blindseg_dist.losses.sampling import sample_seeds
from blindseg_dist.losses.sdcl import sdcl_image_plans, sdcl_pixels, sdcl_plan, semantic_disentanglement_loss
from blindseg_dist.losses.covariance import covariance_losses, covariance_matching_loss, cross_covariance_loss
from blindseg_dist.losses.segmentation import segmentation_loss

__all__ = [
    "covariance_losses",
    "covariance_matching_loss",
    "cross_covariance_loss",
    "class_wise_contrastive_loss",
    "semantic_disentanglement_loss",
    "segmentation_loss",
    "sample_seeds",
    "sample_class_anchors",
    "cwcl_plan",
    "cwcl_pixels",
    "sdcl_image_plans",
    "sdcl_plan",
    "sdcl_pixels",
    "PixelRows",
]
