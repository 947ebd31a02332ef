"""TensorBoard logging from rank 0 only (other ranks get a logger that writes nothing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import dist


class RunLogger:
    """Scalars, images and hparams under ``log_dir``; a no-op on ranks other than 0."""

    def __init__(self, log_dir: str | Path, enabled: bool | None = None):
        self.enabled = dist.rank() == 0 if enabled is None else enabled
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)

    def image(self, tag: str, image_hwc_uint8: np.ndarray, step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_image(tag, torch.from_numpy(np.ascontiguousarray(image_hwc_uint8)), step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_text(tag, markdown, step)

    def hparams(self, hparams: dict, metrics: dict[str, float], run_name: str = ".") -> None:
        if self.writer is None:
            return
        # bools as "True"/"False" (torch would store them as the numbers 1/0), other values as str
        clean = {k: (v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v))
                 for k, v in hparams.items()}
        self.writer.add_hparams(clean, {k: float(v) for k, v in metrics.items()}, run_name=run_name)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


PANEL_TAG = "train/input_augmented_truth_prediction"


def denormalize(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalized (3, H, W) float -> (H, W, 3) uint8 RGB."""
    from ..data.views import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def image_panel(batch: dict, logits, max_images: int = 2) -> np.ndarray:
    """Rows of [input | augmented view | ground truth | prediction] (Cityscapes colours), uint8 HWC.

    ``logits``: (B, C, h, w) of the original view, or the model's train-mode dict ("logits");
    upsampled to the label size when smaller. The augmented column is left out when the batch
    has no augmented view (baseline).
    """
    import torch.nn.functional as F

    from ..data.labels import colorize

    if isinstance(logits, dict):
        logits = logits["logits"]
    n = min(max_images, batch["image"].shape[0])
    logits = logits[:n].detach().float()
    label = batch["label"][:n].cpu()
    if tuple(logits.shape[-2:]) != tuple(label.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=True)
    pred = logits.argmax(1).cpu().numpy()
    aug = batch.get("image_aug")
    rows = []
    for i in range(n):
        cols = [denormalize(batch["image"][i])]
        if aug is not None:
            cols.append(denormalize(aug[i]))
        cols += [colorize(label[i].numpy()), colorize(pred[i])]
        gap = np.full((cols[0].shape[0], 2, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([c for col in cols for c in (col, gap)][:-1], axis=1))
    hgap = np.full((2, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([r for row in rows for r in (row, hgap)][:-1], axis=0)


def log_images(logger: RunLogger | None, batch: dict, logits, step: int, max_images: int = 2) -> None:
    """Log an image panel (input, augmented view, ground truth, prediction) of the first images
    of ``batch`` under ``PANEL_TAG``; a no-op without a writer (ranks other than 0)."""
    if logger is None or logger.writer is None:
        return
    logger.image(PANEL_TAG, image_panel(batch, logits, max_images), step)
