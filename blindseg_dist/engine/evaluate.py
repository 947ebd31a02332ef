"""Evaluation (METHOD.md section 5): single scale, full resolution, one int64 confusion matrix per
target summed across ranks, each image counted exactly once, IoU = TP / (TP + FP + FN), mIoU = nanmean.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import dist
from ..data.labels import CLASS_NAMES, IGNORE, NUM_CLASSES


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) int64, rows = ground truth, columns = prediction; ignore pixels dropped."""
    valid = label != IGNORE
    if bool(((label[valid] < 0) | (label[valid] >= num_classes)).any()):
        bad = torch.unique(label[valid & ((label < 0) | (label >= num_classes))]).tolist()
        raise ValueError(f"labels hold ids {bad} outside 0..{num_classes - 1} and not {IGNORE}")
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray | torch.Tensor) -> tuple[np.ndarray, float]:
    """Per-class IoU (NaN where a class never occurs in ground truth nor prediction) and their nanmean."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return iou, miou


@torch.no_grad()
def predict_logits(net: nn.Module, image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Eval-mode logits of one (1, 3, H, W) image, bilinearly upsampled to the label ``size``."""
    logits = net(image)
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
    return logits


@torch.no_grad()
def evaluate_dataset(
    net: nn.Module,
    dataset,
    *,
    device: torch.device | str = "cpu",
    num_classes: int = NUM_CLASSES,
    max_images: int = 0,
    desc: str = "eval",
    predict: Callable | None = None,
) -> torch.Tensor:
    """Confusion matrix of ``dataset`` summed over all ranks; each rank runs its own contiguous slice.

    The split (``shard_indices``) neither pads nor drops, so the W-rank matrix equals the 1-rank one.
    """
    from ..data.evalset import shard_indices

    n = len(dataset) if not max_images else min(len(dataset), max_images)
    indices = shard_indices(n, dist.rank(), dist.world_size())
    was_training = net.training
    net.eval()
    predict = predict or predict_logits
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in tqdm(indices, desc=desc, disable=dist.rank() != 0, leave=False):
        item = dataset[i]
        image = item["image"][None].to(device)
        label = item["label"]
        logits = predict(net, image, label.shape[-2:])
        cm += confusion_matrix(logits.argmax(1)[0].cpu(), label, num_classes)
    net.train(was_training)
    return dist.all_reduce_sum(cm, tag="eval")


def target_result(cm: torch.Tensor, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """The JSON record of one target: miou, per_class_iou (name -> IoU or null), confusion_matrix."""
    iou, miou = iou_from_confusion(cm)
    return {
        "miou": miou,
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
        "confusion_matrix": cm.tolist(),
        "num_pixels": int(cm.sum()),
    }


def format_table(targets: dict[str, dict], title: str = "mIoU (%)") -> str:
    """A plain-text table: one row per target with mIoU, and the mean over targets."""
    if not targets:
        return "(no targets)"
    width = max(12, max(len(k) for k in targets) + 2)
    lines = [title, f"{'target':<{width}}{'mIoU':>8}", "-" * (width + 8)]
    for name, res in targets.items():
        lines.append(f"{name:<{width}}{100 * res['miou']:>8.2f}")
    mean = float(np.nanmean([res["miou"] for res in targets.values()]))
    lines += ["-" * (width + 8), f"{'mean':<{width}}{100 * mean:>8.2f}"]
    return "\n".join(lines)
