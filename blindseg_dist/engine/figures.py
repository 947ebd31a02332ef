"""Figures a person looks at: the confusion matrix of a target (PNG and TensorBoard) and image panels."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

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

    from .. import atomic

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


def prediction_panels(net, train_shards: str, targets: dict[str, str], *, crop_size: int, seed: int = 0,
                      n_train: int = 2) -> np.ndarray:
    """The panel a person looks at after a run: ``n_train`` training crops as the trainer sees them
    (input | augmented view | ground truth | prediction), then the first frame of each target
    (input | ground truth | prediction, full resolution), predicted by ``net`` in eval mode."""
    import torch

    from ..data.stream import make_train_loader
    from .evaluate import build_eval_dataset, predict_logits, target_protocol
    from .logging import image_panel

    was_training = net.training
    net.eval()
    loader = make_train_loader(train_shards, batch_size=n_train, crop_size=crop_size, num_workers=0, seed=seed)
    batch = next(iter(loader))
    panels = []
    with torch.no_grad():
        panels.append(image_panel(batch, net(batch["image"]), max_images=n_train))
        for name, path in targets.items():
            item = build_eval_dataset(path, target_protocol(name, path))[0]
            one = {"image": item["image"][None], "label": item["label"][None]}
            panels.append(image_panel(one, predict_logits(net, one["image"], item["label"].shape), max_images=1))
    net.train(was_training)
    return stack_panels(panels)
