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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (FreeType)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(cell: np.ndarray, width: int) -> np.ndarray:
    """``cell`` (uint8 HWC) scaled to ``width`` px wide, aspect kept (nearest: label colours stay exact)."""
    import cv2

    h, w = cell.shape[:2]
    if w == width:
        return cell
    return cv2.resize(cell, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_NEAREST)


def titled_grid(sections: Sequence[tuple[str, Sequence[str], Sequence[tuple[str, Sequence[np.ndarray]]]]],
                gap: int = 4, font_size: int = 15) -> np.ndarray:
    """One image of titled grids, one under the other, all exactly as wide: each section is
    (title, column titles, rows of (row label, cells uint8 HWC, one per column)). The widest section at
    its cells' own size sets the width; every section's cells are scaled (aspect kept) to fill it, so no
    part is left blank. A strip above each section names it and its columns; the row label is written
    in the corner of the row's first cell."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    line = font_size + 6
    width = max(len(cols) * max(c.shape[1] for _, cells in rows for c in cells) + gap * (len(cols) - 1)
                for _, cols, rows in sections)
    parts = []
    for title, cols, rows in sections:
        n = len(cols)
        base, extra = divmod(width - gap * (n - 1), n)
        widths = [base + (1 if i < extra else 0) for i in range(n)]
        lefts = [sum(widths[:i]) + gap * i for i in range(n)]
        strip = Image.new("RGB", (width, 2 * line), "white")
        draw = ImageDraw.Draw(strip)
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
        for name, x, w in zip(cols, lefts, widths):
            tw = draw.textlength(name, font=font)
            draw.text((x + max(0, (w - tw) / 2), line + 1), name, fill=(40, 40, 40), font=font)
        parts.append(np.asarray(strip))
        for label, cells in rows:
            if len(cells) != n:
                raise ValueError(f"row {label!r} has {len(cells)} cells for {n} columns")
            fitted = [_fit(c, w) for c, w in zip(cells, widths)]
            h = max(c.shape[0] for c in fitted)
            row = np.full((h, width, 3), 255, np.uint8)
            for c, x in zip(fitted, lefts):
                row[:c.shape[0], x:x + c.shape[1]] = c
            if label:
                im = Image.fromarray(row)
                draw = ImageDraw.Draw(im)
                box = draw.textbbox((4, 3), label, font=font)
                draw.rectangle((0, 0, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
                draw.text((4, 3), label, fill=(255, 255, 255), font=font)
                row = np.asarray(im)
            parts += [row, np.full((gap, width, 3), 255, np.uint8)]
        parts.pop()  # no gap under the last row
    return np.ascontiguousarray(np.concatenate(parts, axis=0))
