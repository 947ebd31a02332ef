"""The BlindNet training objective: the two-view forward that returns a dict of named losses.

Kept as one nn.Module so that DDP sees a single forward per step (both views, every loss),
and the two views are forwarded separately so that BN batch statistics stay per view.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import (
    class_wise_contrastive_loss,
    covariance_matching_loss,
    cross_covariance_loss,
    sample_seeds,
    segmentation_loss,
    semantic_disentanglement_loss,
)

TERMS = ("ce", "ce_aug", "aux", "cml", "ccl", "cwcl", "sdcl")


@dataclass
class LossWeights:
    """Loss weights and scopes (a view of config.LossConfig, so the model never imports config)."""

    two_view: bool = True
    aux: float = 0.4
    cml: float = 0.2
    ccl: float = 0.2
    cwcl: float = 0.3
    sdcl: float = 0.3
    ce_scope: str = "reference"
    covariance_scope: str = "image"
    contrastive_scope: str = "image"
    cwcl_negatives: str = "reference"
    tau: float = 0.07


def _stream_seed(run_seed: int, name: str, level: int) -> int:
    """A distinct sampling seed per (run, loss term, level), stable across processes."""
    return (run_seed * 1_000_003 + zlib.crc32(f"{name}:{level}".encode())) % (2**62)


class BlindNetObjective(nn.Module):
    """Wraps a SegNet; ``forward`` returns {"total": weighted sum, "terms": {name: unweighted value}}.

    L = 0.5 [CE(x) + CE(x_a)] + w_aux aux + w_cml CML + w_ccl CCL + w_cwcl CWCL + w_sdcl SDCL
    (METHOD.md section 3). With two_view=False: L = CE(x) + w_aux aux (the baseline).
    """

    def __init__(self, net: nn.Module, weights: LossWeights, run_seed: int = 0):
        super().__init__()
        self.net = net
        self.w = weights
        self.run_seed = int(run_seed)

    def forward(
        self,
        image: torch.Tensor,  # (B, 3, H, W) original view
        label: torch.Tensor,  # (B, H, W) trainIds, 255 ignore
        image_aug: torch.Tensor | None = None,  # (B, 3, H, W) augmented view
        step: int = 0,
        global_index: torch.Tensor | None = None,  # (B,) index of each image in the global batch stream
    ) -> dict:
        w = self.w
        if global_index is None:
            global_index = torch.arange(image.shape[0])
        out = self.net(image)
        terms: dict[str, torch.Tensor] = {}
        weighted: dict[str, torch.Tensor] = {}
        ce = segmentation_loss(out["logits"], label, scope=w.ce_scope)
        terms["ce"] = ce
        weighted["ce"] = ce * (0.5 if w.two_view else 1.0)
        if w.aux > 0:
            small = F.interpolate(label[:, None].float(), size=out["aux"].shape[-2:], mode="nearest")[:, 0].long()
            terms["aux"] = segmentation_loss(out["aux"], small, scope=w.ce_scope)
            weighted["aux"] = w.aux * terms["aux"]
        if w.two_view:
            if image_aug is None:
                raise ValueError("loss.two_view is on but the batch has no augmented view ('image_aug')")
            out_a = self.net(image_aug, with_aux=False)  # aux CE is on the original view only
            terms["ce_aug"] = segmentation_loss(out_a["logits"], label, scope=w.ce_scope)
            weighted["ce_aug"] = 0.5 * terms["ce_aug"]
            if w.cml > 0:
                terms["cml"] = covariance_matching_loss(out["in_feats"], out_a["in_feats"], scope=w.covariance_scope)
                weighted["cml"] = w.cml * terms["cml"]
            if w.ccl > 0:
                terms["ccl"] = cross_covariance_loss(out["in_feats"], out_a["in_feats"], scope=w.covariance_scope)
                weighted["ccl"] = w.ccl * terms["ccl"]
            if w.cwcl > 0 or w.sdcl > 0:
                with torch.no_grad():
                    pred = out["logits_q"].argmax(1)  # (B, H/4, W/4)
                    pred_aug = out_a["logits_q"].argmax(1)
                levels = len(out["embeds"])
                if w.cwcl > 0:
                    vals = [
                        class_wise_contrastive_loss(
                            out_a["embeds"][j], out["embeds"][j], label, pred,
                            negatives=w.cwcl_negatives, scope=w.contrastive_scope, tau=w.tau,
                            seeds=sample_seeds(_stream_seed(self.run_seed, "cwcl", j), step, global_index),
                        )
                        for j in range(levels)
                    ]
                    terms["cwcl"] = torch.stack(vals).mean()
                    weighted["cwcl"] = w.cwcl * terms["cwcl"]
                if w.sdcl > 0:
                    vals = [
                        semantic_disentanglement_loss(
                            out_a["embeds"][j], out["embeds"][j], label, pred, pred_aug,
                            scope=w.contrastive_scope, tau=w.tau,
                            seeds=sample_seeds(_stream_seed(self.run_seed, "sdcl", j), step, global_index),
                        )
                        for j in range(levels)
                    ]
                    terms["sdcl"] = torch.stack(vals).mean()
                    weighted["sdcl"] = w.sdcl * terms["sdcl"]
        # float32 at least (terms of fp16/bf16 logits), but a float64 model keeps a float64 total:
        # v.float() rounded it to float32 (tests/engine/test_train_step_ddp.py runs in float64)
        dtype = torch.float32
        for v in weighted.values():
            dtype = torch.promote_types(dtype, v.dtype)
        total = torch.stack([v.to(dtype) for v in weighted.values()]).sum()
        return {"total": total, "terms": terms, "logits": out["logits"]}
