"""TensorBoard logging from rank 0 only (other ranks get a logger that writes nothing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..data.labels import colorize
from ..data.views import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from .figures import figure_to_array


def make_trackers(log_with, log_dir: Path, purge_step: int | None = None) -> list:
    """Started accelerate trackers for ``run.log_with``. TensorBoard writes to ``log_dir`` (with
    ``purge_step`` on a resume: events after the resumed step are dropped); the others get the run
    folder's name as run/experiment name and, where they keep local files, the run folder (e.g.
    wandb with WANDB_MODE=offline). A tracker whose package is missing is a ConfigError."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    trackers = []
    for name in log_with:
        if name not in available:
            raise ConfigError(f"config key 'run.log_with': {name!r} is not installed here (available: "
                              f"{sorted(available)}); install its package or drop it")
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            kwargs = {"purge_step": purge_step} if purge_step else {}
            tracker = cls(log_dir.name, log_dir.parent, **kwargs)
        elif cls.requires_logging_directory:
            tracker = cls(log_dir.parent.name, log_dir.parent)
        else:
            tracker = cls(log_dir.parent.name)
        tracker.start()
        trackers.append(tracker)
    return trackers


class RunLogger:
    """Scalars, images and hparams to the ``run.log_with`` trackers (TensorBoard under ``log_dir``);
    a no-op on ranks other than 0."""

    def __init__(self, log_dir: str | Path, enabled: bool | None = None, log_with=("tensorboard",),
                 purge_step: int | None = None):
        self.enabled = dist.rank() == 0 if enabled is None else enabled
        self.writer = None  # TensorBoard's SummaryWriter when it is among the trackers
        self.trackers: list = []
        if self.enabled:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.trackers = make_trackers(list(log_with), Path(log_dir), purge_step)
            self.writer = next((t.writer for t in self.trackers if t.name == "tensorboard"), None)

    @property
    def others(self) -> list:
        """The trackers other than TensorBoard (written through accelerate's tracker API)."""
        return [t for t in self.trackers if t.name != "tensorboard"]

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, float(v), step)
        for t in self.others:
            t.log({k: float(v) for k, v in values.items()}, step=step)

    def image(self, tag: str, image_hwc_uint8: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, torch.from_numpy(np.ascontiguousarray(image_hwc_uint8)), step,
                                  dataformats="HWC")
        for t in self.others:
            if hasattr(t, "log_images"):
                t.log_images({tag: [np.ascontiguousarray(image_hwc_uint8)]}, step=step)

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure (TensorBoard's add_figure; the other trackers get it as an image)."""
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step, close=False)
        if self.others:
            arr = figure_to_array(figure)
            for t in self.others:
                if hasattr(t, "log_images"):
                    t.log_images({tag: [arr]}, step=step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, markdown, step)
        for t in self.others:
            t.log({tag: markdown}, step=step)

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
        for t in self.trackers:
            t.finish()
        self.trackers, self.writer = [], None


PANEL_TAG = "train/input_augmented_truth_prediction"


def denormalize(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalized (3, H, W) float -> (H, W, 3) uint8 RGB."""
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
    if logger is None or (logger.writer is None and not getattr(logger, "trackers", None)):
        return
    logger.image(PANEL_TAG, image_panel(batch, logits, max_images), step)
