"""Mapillary Vistas v1.2: ``{training,validation}/images/<id>.jpg`` and ``.../labels/<id>.png``
(8-bit palette, ids 0..65), or the v1.2+v2.0 release with ``.../v1.2/labels/<id>.png``.
Label maps: ``robustnet`` (default) or ``openseg``."""
from __future__ import annotations

from pathlib import Path

from ..labels import MAPILLARY_MAPS
from .base import Item, Source, check_not_empty, first_dir, layout_error, sanitize_key

SPLIT_DIRS = {"train": "training", "val": "validation"}
EXPECTED = ["<root>/{training,validation}/images/<id>.jpg + .../labels/<id>.png (v1.2)",
            "<root>/{training,validation}/images/<id>.jpg + .../v1.2/labels/<id>.png (v1.2+v2.0)"]


def open_mapillary(root: str, split: str = "val", label_map: str = "robustnet") -> Source:
    """List Mapillary pairs of ``split`` (train | val) with the named 66->19 ``label_map``."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"mapillary: unknown split {split!r}; choose one of {list(SPLIT_DIRS)}")
    if label_map not in MAPILLARY_MAPS:
        raise ValueError(f"mapillary: unknown label_map {label_map!r}; "
                         f"choose one of {list(MAPILLARY_MAPS)}")
    base = Path(root) / SPLIT_DIRS[split]
    img_root = base / "images"
    lab_root = first_dir([base / "v1.2" / "labels", base / "labels"])
    if not img_root.is_dir() or lab_root is None:
        missing = img_root if not img_root.is_dir() else base / "labels"
        raise layout_error("mapillary", root, EXPECTED, f"Missing folder: {missing}\n")
    src = Source("mapillary", str(root), split, MAPILLARY_MAPS[label_map])
    images = sorted(p for p in img_root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for img in images:
        lab = lab_root / f"{img.stem}.png"
        if lab.is_file():
            src.items.append(Item(sanitize_key(img.stem), str(img), str(lab)))
        else:
            src.skipped.append({"key": sanitize_key(img.stem), "reason": f"no label file {lab}"})
    return check_not_empty(src, str(img_root))
