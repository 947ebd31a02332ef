"""Segmentation cross-entropy with the two distributed scopes (docs/DISTRIBUTED.md, "Loss scopes").

"reference": per-rank mean CE over valid pixels, as the released code. After DDP's
  averaging this is the mean of per-rank means, which equals the global mean only when every
  rank has the same number of valid pixels (docs/DISTRIBUTED.md, "Loss scopes"). A rank with no valid
  pixel returns a 0 connected to the logits (PyTorch's mean would be NaN and poison the
  gradient all-reduce).
"exact": sum of per-pixel CE over valid pixels / global valid-pixel count (all-reduced),
  scaled by dist.global_mean so the rank mean and DDP's gradient are exact on any split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blindseg_dist import dist
from blindseg_dist.config import CE_SCOPES as SCOPES
from blindseg_dist.data.labels import IGNORE



def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, *, scope: str = "reference",
                      ignore_index: int = IGNORE) -> torch.Tensor:
    """Cross-entropy of (B, K, H, W) logits against (B, H, W) labels (ignore_index skipped)."""
    if scope not in SCOPES:
        raise ValueError(f"segmentation_loss: scope={scope!r} is not one of {SCOPES}; set "
                         "loss.ce_scope in the config to one of them")
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"segmentation_loss: logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} do not match; expected (B, K, H, W) and "
                         "(B, H, W) (upsample the logits to the label size first)")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    labels = labels.long()
    if scope == "reference":
        # the mean over valid pixels as sum / count, the count kept on the device (no host read); with
        # no valid pixel the sum is a 0 that is still a function of the logits
        n_valid = (labels != ignore_index).sum()
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / n_valid.clamp(min=1)
    n_valid = int((labels != ignore_index).sum())
    n_global = dist.all_reduce_count([n_valid], tag="seg", device=logits.device)[0]
    ce_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return dist.global_mean(ce_sum, n_global) + logits.sum() * 0.0
