"""Figures a person looks at, rendering only: the confusion matrix of a target (PNG and TensorBoard)
and panels stacked into one image (the demo's prediction panels are built in tools/demo.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import atomic
from ..data.labels import CLASS_NAMES


def confusion_figure(cm, title: str = "", class_names: Sequence[str] = CLASS_NAMES):
    """A matplotlib figure of the row-normalized confusion matrix (rows: ground truth, columns:
    prediction; each row sums to 1 over the pixels of that class; classes never in the ground
    truth are an empty row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, cm / rows, np.nan)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion matrix (row-normalized)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a drawn matplotlib figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_confusion_png(cm, path: str | Path, title: str = "") -> Path:
    """The confusion-matrix figure as a PNG (written atomically)."""
    import matplotlib.pyplot as plt

    fig = confusion_figure(cm, title)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def stack_panels(panels: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Panels (uint8 HWC) one under the other, left-aligned, padded white to the widest."""
    width = max(p.shape[1] for p in panels)
    rows = []
    for i, p in enumerate(panels):
        pad = np.full((p.shape[0], width - p.shape[1], 3), 255, np.uint8)
        rows.append(np.concatenate([p, pad], axis=1))
        if i < len(panels) - 1:
            rows.append(np.full((gap, width, 3), 255, np.uint8))
    return np.concatenate(rows, axis=0)
