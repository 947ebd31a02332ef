"""BDD100K semantic segmentation: labels are trainIds already, images JPEG.

Old release ``seg/images/<split>/<name>.jpg`` + ``seg/labels/<split>/<name>_train_id.png``;
new release ``images/10k/<split>/<name>.jpg`` + ``labels/sem_seg/masks/<split>/<name>.png``.
Lists are built from the label folder (some new-release images have no mask).
"""
from __future__ import annotations

from pathlib import Path

from ..labels import BDD100K
from .base import Item, Source, check_not_empty, layout_error, sanitize_key

SPLITS = ("train", "val")
EXPECTED = ["<root>/seg/images/<split>/<name>.jpg + <root>/seg/labels/<split>/<name>_train_id.png "
            "(old release; <root> may also be the seg/ folder)",
            "<root>/images/10k/<split>/<name>.jpg + <root>/labels/sem_seg/masks/<split>/<name>.png "
            "(new release)"]


def open_bdd100k(root: str, split: str = "val") -> Source:
    """List BDD100K pairs of ``split`` (train | val) under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"bdd100k: unknown split {split!r}; choose one of {list(SPLITS)}")
    base = Path(root)
    layouts = [(base / "seg" / "images", base / "seg" / "labels", "_train_id.png"),
               (base / "images", base / "labels", "_train_id.png"),
               (base / "images" / "10k", base / "labels" / "sem_seg" / "masks", ".png")]
    for img_root, lab_root, suffix in layouts:
        if (lab_root / split).is_dir() and any((lab_root / split).glob(f"*{suffix}")):
            break
    else:
        raise layout_error("bdd100k", root, EXPECTED,
                           f"Missing a label folder with files for split {split!r}.\n")
    src = Source("bdd100k", str(root), split, BDD100K)
    for lab in sorted((lab_root / split).glob(f"*{suffix}")):
        name = lab.name[: -len(suffix)]
        img = next((p for p in (img_root / split / f"{name}{e}" for e in (".jpg", ".jpeg", ".png"))
                    if p.is_file()), None)
        if img is None:
            src.skipped.append({"key": sanitize_key(name),
                                "reason": f"no image {img_root / split / name}.jpg"})
        else:
            src.items.append(Item(sanitize_key(name), str(img), str(lab)))
    return check_not_empty(src, str(lab_root / split))
