"""The BlindNet training objective: the two-view forward that returns a dict of named losses.

Kept as one nn.Module so that DDP sees a single forward per step (both views, every loss),
and the two views are forwarded separately so that BN batch statistics stay per view.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..config import LossConfig
from ..losses.pixels import rows_at
from ..losses import (
    PixelRows,
    class_wise_contrastive_loss,
    covariance_losses,
    cwcl_pixels,
    cwcl_plan,
    sample_seeds,
    sdcl_pixels,
    sdcl_image_plans,
    sdcl_plan,
    segmentation_loss,
    semantic_disentanglement_loss,
)
from ..losses.plans import cwcl_plan_from_loader, stream_seed


# The objective takes the config's loss section itself (weights and scopes): one definition.
LossWeights = LossConfig


_stream_seed = stream_seed  # a distinct sampling seed per (run, loss term, level): losses/plans.py


def projection_sizes(net: nn.Module, crop: int) -> tuple[tuple[int, int], ...]:
    """(h, w) of each projection level's embeddings for a (crop, crop) training input: one forward
    of a copy of ``net`` on the meta device (shapes only, no compute, ``net`` untouched)."""
    meta = copy.deepcopy(net).to("meta").train()
    dtype = next(meta.parameters()).dtype
    if getattr(meta, "decode_head", None) == "mask2former":
        # transformers' pixel decoder checks its values in training (not on meta); its levels have the
        # sizes of the backbone outputs it reads (pd32 the last, ..., mask the stride-4 one)
        with torch.no_grad():
            feats, _ = meta.backbone(torch.empty(2, 3, crop, crop, device="meta", dtype=dtype))
        src = dict(low=0, mid=1, aux=2, high=3, pd32=3, pd16=2, pd8=1, mask=0)
        return tuple(tuple(int(v) for v in feats[src[p]].shape[-2:]) for p in meta.proj_levels)
    with torch.no_grad():
        out = meta(torch.empty(2, 3, crop, crop, device="meta", dtype=dtype), dense_embeds=False)
    return tuple(tuple(int(v) for v in f.shape[-2:]) for f in out["proj_inputs"])


class BlindNetObjective(nn.Module):
    """Wraps a SegNet; ``forward`` returns {"total": weighted sum, "terms": {name: unweighted value}}.

    L = 0.5 [CE(x) + CE(x_a)] + w_aux aux + w_cml CML + w_ccl CCL + w_cwcl CWCL + w_sdcl SDCL
    (docs/METHOD.md, "Losses"). With two_view=False: L = CE(x) + w_aux aux (the baseline).
    With a Mask2Former head, Mask2Former's set loss (terms "m2f", "m2f_aug") takes CE's place.
    """

    def __init__(self, net: nn.Module, weights: LossWeights, run_seed: int = 0, sparse_heads: bool = True):
        super().__init__()
        self.net = net
        self.w = weights
        self.run_seed = int(run_seed)
        # The projection heads are per-pixel MLPs and the contrastive losses read only the pixels
        # they sample (from labels and predictions alone), so sampling first and running the heads
        # at those pixels gives the dense values and gradients exactly, at a fraction of the cost
        # (tests/model/test_objective.py compares both; bench/step_overhead.py measures it).
        self.sparse_heads = sparse_heads
        # Mask2Former: the set loss (losses/mask2former.py) replaces the pixel CE of each view
        self.m2f = None
        if getattr(net, "decode_head", "deeplabv3plus") == "mask2former":
            from ..losses.mask2former import Mask2FormerCriterion

            self.m2f = Mask2FormerCriterion(net.decoder.num_classes, points=net.decoder.config.train_num_points)

    def forward(
        self,
        image: torch.Tensor,  # (B, 3, H, W) original view
        label: torch.Tensor,  # (B, H, W) trainIds, 255 ignore
        image_aug: torch.Tensor | None = None,  # (B, 3, H, W) augmented view
        step: int = 0,
        global_index: torch.Tensor | None = None,  # (B,) index of each image in the global batch stream
        plans: list[dict] | None = None,  # CWCL's loader plans per level (losses/plans.py), made for `step`
        sdcl_keys: list[torch.Tensor] | None = None,  # SDCL's per-pixel keys per level, drawn in the loader
    ) -> dict:
        w = self.w
        if global_index is None:
            global_index = torch.arange(image.shape[0])
        dense = not self.sparse_heads
        out = self.net(image, dense_embeds=dense)
        terms: dict[str, torch.Tensor] = {}
        weighted: dict[str, torch.Tensor] = {}
        seg_name = "ce" if self.m2f is None else "m2f"
        terms[seg_name] = self._segmentation(out, label, step, global_index, "x")
        weighted[seg_name] = terms[seg_name] * (0.5 if w.two_view else 1.0)
        if w.aux > 0:
            small = F.interpolate(label[:, None].float(), size=out["aux"].shape[-2:], mode="nearest")[:, 0].long()
            terms["aux"] = segmentation_loss(out["aux"], small, scope=w.ce_scope)
            weighted["aux"] = w.aux * terms["aux"]
        if w.two_view:
            if image_aug is None:
                raise ValueError("loss.two_view is on but the batch has no augmented view ('image_aug')")
            out_a = self.net(image_aug, with_aux=False, dense_embeds=dense)  # aux CE: original view only
            terms[f"{seg_name}_aug"] = self._segmentation(out_a, label, step, global_index, "x_aug")
            weighted[f"{seg_name}_aug"] = 0.5 * terms[f"{seg_name}_aug"]
            if w.cml > 0 or w.ccl > 0:  # one pass: both gradients reach the IN outputs as one tensor
                with record_function("blindseg/cml+ccl"):  # a labelled range in profiles (bench/)
                    cov = covariance_losses(out["in_feats"], out_a["in_feats"], scope=w.covariance_scope,
                                            cml=w.cml > 0, ccl=w.ccl > 0)
                for name, v in cov.items():
                    terms[name] = v
                    weighted[name] = getattr(w, name) * v
            if w.cwcl > 0 or w.sdcl > 0:
                self._contrastive(out, out_a, label, step, global_index, terms, weighted, plans, sdcl_keys)
        # float32 at least (terms of fp16/bf16 logits), but a float64 model keeps a float64 total
        # (tests/engine/test_train_step_ddp.py runs in float64)
        dtype = torch.float32
        for v in weighted.values():
            dtype = torch.promote_types(dtype, v.dtype)
        total = torch.stack([v.to(dtype) for v in weighted.values()]).sum()
        return {"total": total, "terms": terms, "logits": out["logits"]}

    def _segmentation(self, out, label, step, global_index, view: str) -> torch.Tensor:
        """The segmentation loss of one view: pixel CE (DeepLabV3+), or Mask2Former's set loss summed
        over the decoder layers, matched per image with per-(view, layer, image) seeds."""
        if self.m2f is None:
            return segmentation_loss(out["logits"], label, scope=self.w.ce_scope)
        layers = out["m2f"]["mask_logits"]
        seeds = torch.stack([sample_seeds(_stream_seed(self.run_seed, f"m2f:{view}", j), step, global_index)
                             for j in range(len(layers))])
        with record_function("blindseg/mask2former"):
            return self.m2f(out["m2f"]["class_logits"], layers, label, seeds)["total"]

    def _contrastive(self, out, out_a, label, step, global_index, terms, weighted, plans=None,
                     sdcl_keys=None) -> None:
        """CWCL and SDCL averaged over the three decoder levels (sampling first when sparse; CWCL's
        finished on the device from the loader's plans when given: the same draws)."""
        w = self.w
        with torch.no_grad():
            pred = out["logits_q"].argmax(1)  # (B, H/4, W/4)
            pred_aug = out_a["logits_q"].argmax(1)
        cwcl_vals, sdcl_vals = [], []
        levels = len(out["embeds"] if out["embeds"] is not None else out["proj_inputs"])
        sd_seeds_all = [sample_seeds(_stream_seed(self.run_seed, "sdcl", j), step, global_index)
                        for j in range(levels)]
        sd_plans = None
        if w.sdcl > 0 and w.contrastive_scope == "image" and out["embeds"] is None:
            # every level's SDCL sampling at once: one host read for the step (losses/sdcl.py)
            with record_function("blindseg/sampling"):
                sd_plans = sdcl_image_plans(label, pred, pred_aug,
                                            [tuple(f.shape[-2:]) for f in out["proj_inputs"]],
                                            seeds=sd_seeds_all, keys=sdcl_keys)
        for j in range(levels):
            cw_seeds = sample_seeds(_stream_seed(self.run_seed, "cwcl", j), step, global_index)
            sd_seeds = sd_seeds_all[j]
            if out["embeds"] is not None:
                emb, emb_a = out["embeds"][j], out_a["embeds"][j]
                cw_plan = sd_plan = None
            else:
                sd_plan = sd_plans[j] if sd_plans is not None else None
                emb, emb_a, cw_plan, sd_plan = self._sparse_level(j, out, out_a, label, pred, pred_aug, cw_seeds,
                                                                  sd_seeds, sd_plan, plans, sdcl_keys)
            if w.cwcl > 0:
                with record_function("blindseg/cwcl"):
                    cwcl_vals.append(class_wise_contrastive_loss(
                        emb_a, emb, label, pred, negatives=w.cwcl_negatives, scope=w.contrastive_scope, tau=w.tau,
                        global_keys=w.cwcl_global_keys,
                        seeds=cw_seeds, plan=cw_plan))
            if w.sdcl > 0:
                with record_function("blindseg/sdcl"):
                    sdcl_vals.append(semantic_disentanglement_loss(
                        emb_a, emb, label, pred, pred_aug, scope=w.contrastive_scope, tau=w.tau,
                        seeds=sd_seeds, plan=sd_plan))
        if cwcl_vals:
            terms["cwcl"] = torch.stack(cwcl_vals).mean()
            weighted["cwcl"] = w.cwcl * terms["cwcl"]
        if sdcl_vals:
            terms["sdcl"] = torch.stack(sdcl_vals).mean()
            weighted["sdcl"] = w.sdcl * terms["sdcl"]

    def _sparse_level(self, j, out, out_a, label, pred, pred_aug, cw_seeds, sd_seeds, sd_plan, plans,
                      sdcl_keys):
        """Level j with sparse heads: the CWCL plan (from the loader's plan when given) and the SDCL plan
        (``sd_plan`` when already made for every level), then both views' embeddings at the union of
        the pixels the plans read -> (emb, emb_a, cw_plan, sd_plan)."""
        w = self.w
        f, f_a = out["proj_inputs"][j], out_a["proj_inputs"][j]  # (B, C, h, w)
        size = tuple(f.shape[-2:])
        with record_function("blindseg/sampling"):
            if w.cwcl <= 0:
                cw_plan = None
            elif plans is not None:
                if plans[j]["pix"].shape[-1] != size[0] * size[1]:
                    raise ValueError(f"the loader's CWCL plan of level {j} is for "
                                     f"{plans[j]['pix'].shape[-1]} pixels, the level has {size}")
                cw_plan = cwcl_plan_from_loader(plans[j], pred, size)
            else:
                cw_plan = cwcl_plan(label, pred, size, seeds=cw_seeds)
            if sd_plan is None and w.sdcl > 0:
                sd_plan = sdcl_plan(label, pred, pred_aug, size, scope=w.contrastive_scope, seeds=sd_seeds,
                                    keys=None if sdcl_keys is None else sdcl_keys[j])
            n = size[0] * size[1]
            read = [cwcl_pixels(cw_plan, n)] if cw_plan is not None else []
            read += [sdcl_pixels(sd_plan)] if sd_plan is not None else []
            # sorted flat indices into B*h*w, repeats kept: a pixel both losses read is embedded twice
            # (the heads are per pixel, so both rows are equal and the losses read the first), which
            # costs a few rows and saves unique's host read
            pix = torch.sort(torch.cat(read)).values
        with record_function("blindseg/heads"):
            emb_a = self._embed_at(j, f_a, pix)
            with torch.no_grad():  # original-view embeddings are only used detached
                emb = self._embed_at(j, f, pix)
        return emb, emb_a, cw_plan, sd_plan

    def _embed_at(self, level: int, feats: torch.Tensor, pix: torch.Tensor) -> PixelRows:
        """The projection of ``feats`` (B, C, h, w) at the sorted flat pixels ``pix`` only, as
        PixelRows: the losses read these rows directly (no dense map, no dense zero gradient)."""
        b, c, h, w = feats.shape
        z = self.net.embed_rows(level, rows_at(feats, pix))  # (P, C) -> (P, D)
        return PixelRows(z, pix, (b, z.shape[1], h, w))
