"""SYNTHIA-RAND-CITYSCAPES: ``RGB/NNNNNNN.png`` and ``GT/LABELS/NNNNNNN.png``.

Labels are 16-bit multi-channel PNGs; the class id is the first channel in RGB order (the last
one as OpenCV returns BGR). PIL truncates them to 8 bits, so they are read with OpenCV.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..labels import SYNTHIA
from .base import Item, SampleError, Source, check_not_empty, layout_error
from .base import read_split_list, select_stems

SHIPPED = {"train": "synthia_split_train.txt", "val": "synthia_split_val.txt"}
EXPECTED = ["<root>/RGB/0000000.png + <root>/GT/LABELS/0000000.png (16-bit)",
            "<root>/RAND_CITYSCAPES/RGB/... + <root>/RAND_CITYSCAPES/GT/LABELS/..."]


class SynthiaSource(Source):
    """SYNTHIA reader: 16-bit class ids via OpenCV."""

    def read_raw_label(self, path: str) -> np.ndarray:
        data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
        if arr is None:
            raise SampleError(f"unreadable label: {path}")
        if arr.ndim == 3:
            arr = arr[..., 2]  # BGR(A) from OpenCV -> R = first channel in RGB order
        return np.ascontiguousarray(arr)


def open_synthia(root: str, split: str = "train") -> Source:
    """List SYNTHIA pairs of ``split`` (train | val | all | list file) under ``root``."""
    base = next((b for b in (Path(root), Path(root) / "RAND_CITYSCAPES")
                 if (b / "RGB").is_dir() and (b / "GT" / "LABELS").is_dir()), None)
    if base is None:
        raise layout_error("synthia", root, EXPECTED, "Missing folder: RGB/ or GT/LABELS/\n")
    split_name, stems = read_split_list(split, SHIPPED)
    img_root, lab_root = base / "RGB", base / "GT" / "LABELS"
    src = SynthiaSource("synthia", str(root), split_name, SYNTHIA)
    by_stem = {p.stem: p for p in img_root.glob("*.png")}
    by_stem = select_stems(src, by_stem, stems, img_root)
    for stem in sorted(by_stem):
        lab = lab_root / f"{stem}.png"
        if lab.is_file():
            src.items.append(Item(stem, str(by_stem[stem]), str(lab)))
        else:
            src.skipped.append({"key": stem, "reason": f"no label file {lab}"})
    return check_not_empty(src, str(img_root))
