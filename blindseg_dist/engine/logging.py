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

    def hparams(self, hparams: dict, metrics: dict[str, float], run_name: str = ".") -> None:
        if self.writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {k: float(v) for k, v in metrics.items()}, run_name=run_name)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
