"""GTA5 (Richter et al. 2016): RGB PNGs and palette PNG labels whose index is the labelId.

Layouts: ``images/NNNNN.png`` + ``labels/NNNNN.png`` (as downloaded), or the RobustNet layout
``images/{train,valid,test}/<folder>/NNNNN.png`` with ``labels/`` mirrored.
Splits: ``train``/``val``/``test`` (shipped RobustNet lists), ``all``, or a list file path.
"""
from __future__ import annotations

from pathlib import Path

from ..labels import CITYSCAPES
from .base import Item, Source, check_not_empty, layout_error, read_split_list, select_stems

SHIPPED = {"train": "gtav_split_train.txt", "val": "gtav_split_val.txt",
           "test": "gtav_split_test.txt"}
ROBUSTNET_DIRS = {"train": ["train"], "val": ["valid"], "test": ["test"]}
EXPECTED = ["<root>/images/00001.png + <root>/labels/00001.png (as downloaded)",
            "<root>/images/{train,valid,test}/<folder>/00001.png + <root>/labels/... (RobustNet)"]


def open_gta5(root: str, split: str = "all") -> Source:
    """List GTA5 pairs of ``split`` under ``root``."""
    base = Path(root)
    img_root, lab_root = base / "images", base / "labels"
    if not img_root.is_dir():
        raise layout_error("gta5", root, EXPECTED, f"Missing folder: {img_root}\n")
    if not lab_root.is_dir():
        raise layout_error("gta5", root, EXPECTED, f"Missing folder: {lab_root}\n")
    split_name, stems = read_split_list(split, SHIPPED)
    flat = sorted(img_root.glob("*.png"))
    if flat:
        images = flat
    else:
        # The folders are the shipped split; 'all' and user lists search every folder.
        sub = ROBUSTNET_DIRS.get(split, ["train", "valid", "test"])
        images = sorted(p for s in sub for p in (img_root / s).glob("*/*.png"))
        stems = None if split in ROBUSTNET_DIRS else stems
    src = Source("gta5", str(root), split_name, CITYSCAPES)
    by_stem = {p.stem: p for p in images}
    by_stem = select_stems(src, by_stem, stems, img_root)
    for stem in sorted(by_stem):
        img = by_stem[stem]
        lab = lab_root / img.relative_to(img_root)
        if lab.is_file():
            src.items.append(Item(stem, str(img), str(lab)))
        else:
            src.skipped.append({"key": stem, "reason": f"no label file {lab}"})
    return check_not_empty(src, str(img_root))
