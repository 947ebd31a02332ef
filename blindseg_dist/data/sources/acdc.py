"""ACDC (Adverse Conditions Dataset with Correspondences; fog, night, rain, snow) as released:
``rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png`` and
``gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png`` (8-bit trainIds; the release also has
``_gt_labelIds``, ``_gt_labelColor`` and ``_gt_invIds`` beside them, and ``<split>_ref`` folders of
reference frames without labels, which are not read). The test split has no public labels.

``condition``: one of fog, night, rain, snow, or all (the four together). Keys are
``<condition>_<name>``; the manifest's split is ``<condition>_<split>`` (e.g. ``fog_val``).
"""
from __future__ import annotations

from pathlib import Path

from ..labels import ACDC
from .base import Item, Source, check_not_empty, layout_error, sanitize_key

CONDITIONS = ("fog", "night", "rain", "snow")
SPLITS = ("train", "val")
EXPECTED = ["<root>/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png + "
            "<root>/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png "
            "(condition: fog, night, rain, snow)"]
IMG_SUFFIX, LAB_SUFFIX = "_rgb_anon.png", "_gt_labelTrainIds.png"


def open_acdc(root: str, split: str = "val", condition: str = "all") -> Source:
    """List ACDC pairs of ``split`` (train | val) for ``condition`` (fog | night | rain | snow | all)."""
    if split not in SPLITS:
        hint = " (the test split has no public labels)" if split == "test" else ""
        raise ValueError(f"acdc: unknown split {split!r}{hint}; choose one of {list(SPLITS)}")
    if condition not in (*CONDITIONS, "all"):
        raise ValueError(f"acdc: unknown condition {condition!r}; choose one of {[*CONDITIONS, 'all']}")
    base = Path(root)
    conds = CONDITIONS if condition == "all" else (condition,)
    missing = [f"{top}/{c}/{split}" for c in conds for top in ("rgb_anon", "gt") if not (base / top / c / split).is_dir()]
    if missing and (condition != "all" or len(missing) == 2 * len(conds)):
        raise layout_error("acdc", root, EXPECTED, f"Missing folder: {missing[0]}\n")
    src = Source("acdc", str(root), f"{condition}_{split}", ACDC)
    for c in conds:
        img_root, lab_root = base / "rgb_anon" / c / split, base / "gt" / c / split
        if not img_root.is_dir() or not lab_root.is_dir():  # `all` with a condition not downloaded
            src.warnings.append(f"acdc: condition {c!r} has no {img_root} or {lab_root}; not included")
            continue
        for img in sorted(img_root.glob(f"*/*{IMG_SUFFIX}")):
            name = img.name[: -len(IMG_SUFFIX)]
            key = sanitize_key(f"{c}_{name}")
            lab = lab_root / img.parent.name / f"{name}{LAB_SUFFIX}"
            if lab.is_file():
                src.items.append(Item(key, str(img), str(lab)))
            else:
                src.skipped.append({"key": key, "reason": f"no label file {lab}"})
    return check_not_empty(src, str(base / "rgb_anon"))
