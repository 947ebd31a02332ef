"""Cityscapes: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (also with the RobustNet
``leftImg8bit_trainvaltest/`` and ``gtFine_trainvaltest/`` levels)."""
from __future__ import annotations

from pathlib import Path

from ..labels import CITYSCAPES
from .base import Item, Source, check_not_empty, first_dir, layout_error

SPLITS = ("train", "val", "test")
EXPECTED = ["<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png + <root>/gtFine/<split>/<city>/"
            "*_gtFine_labelIds.png (official)",
            "<root>/leftImg8bit_trainvaltest/leftImg8bit/<split>/... + "
            "<root>/gtFine_trainvaltest/gtFine/<split>/... (RobustNet)"]
IMG_SUFFIX, LAB_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def open_cityscapes(root: str, split: str = "val") -> Source:
    """List Cityscapes pairs of ``split`` (train | val | test) under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"cityscapes: unknown split {split!r}; choose one of {list(SPLITS)}")
    base = Path(root)
    img_root = first_dir([base / "leftImg8bit" / split,
                          base / "leftImg8bit_trainvaltest" / "leftImg8bit" / split])
    lab_root = first_dir([base / "gtFine" / split, base / "gtFine_trainvaltest" / "gtFine" / split])
    if img_root is None or lab_root is None:
        what = "leftImg8bit" if img_root is None else "gtFine"
        raise layout_error("cityscapes", root, EXPECTED, f"Missing folder: {what}/{split}\n")
    src = Source("cityscapes", str(root), split, CITYSCAPES)
    for img in sorted(img_root.glob(f"*/*{IMG_SUFFIX}")):
        stem = img.name[: -len(IMG_SUFFIX)]
        lab = lab_root / img.parent.name / f"{stem}{LAB_SUFFIX}"
        if lab.is_file():
            src.items.append(Item(stem, str(img), str(lab)))
        else:
            src.skipped.append({"key": stem, "reason": f"no label file {lab}"})
    return check_not_empty(src, str(img_root))
