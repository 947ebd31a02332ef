"""Writers of tiny dataset folders in the real on-disk formats (names, modes, bit depths),
shared by the data tests (imported as tests.data._dataset_formats)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from blindseg_dist.data.labels import CITYSCAPES_ID_COLOURS

H, W = 12, 20


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ids(seed: int, values, h: int = H, w: int = W, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed + 1000).choice(np.asarray(values), (h, w)).astype(dtype)


def save_rgb_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "RGB").save(path)


def save_jpg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "RGB").save(path, quality=95)


def save_palette_png(path: Path, idx: np.ndarray, palette: np.ndarray | None = None) -> None:
    """8-bit palette PNG whose pixel values are the indices (GTA5 / Mapillary style)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (idx.shape[1], idx.shape[0]), np.ascontiguousarray(idx).tobytes())
    pal = np.zeros((256, 3), np.uint8)
    if palette is None:
        palette = CITYSCAPES_ID_COLOURS
    pal[: len(palette)] = palette
    im.putpalette(pal.ravel().tolist())
    im.save(path)


def save_gray_png(path: Path, idx: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(idx, "L").save(path)


def save_synthia_label(path: Path, cls: np.ndarray, inst: np.ndarray) -> None:
    """16-bit 3-channel PNG: class id in R (first channel in RGB order), instance id in G."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.zeros(cls.shape + (3,), np.uint16)
    bgr[..., 2] = cls  # R
    bgr[..., 1] = inst  # G
    assert cv2.imwrite(str(path), bgr)


CS_IDS = [0, 1, 4, 7, 8, 11, 17, 18, 21, 23, 24, 26, 33]  # includes void ids and polegroup 18


def write_cityscapes(tmp_path: Path) -> Path:
    """Official Cityscapes layout, val split, two cities, 3 images; returns the root."""
    root = tmp_path / "cityscapes"
    for n, (city, frame) in enumerate([("frankfurt", 1), ("frankfurt", 2), ("lindau", 7)]):
        stem = f"{city}_000000_{frame:06d}"
        save_rgb_png(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", rgb(n))
        save_gray_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png",
                      ids(n, CS_IDS))
    return root


def write_acdc(root: Path, frames: dict[str, list[str]], split: str = "val") -> dict[str, tuple]:
    """ACDC as released: rgb_anon/<cond>/<split>/<seq>/<name>_rgb_anon.png and gt/<cond>/<split>/<seq>/
    <name>_gt_labelTrainIds.png (8-bit trainIds), with the release's other files beside them
    (_gt_labelIds, _gt_labelColor, _gt_invIds and a <split>_ref folder without labels) that the reader
    must ignore. frames: condition -> names (``GOPR0476_frame_000854``; the sequence is the first part).
    Returns {key: (image, trainIds)}."""
    out = {}
    for n, (cond, names) in enumerate(frames.items()):
        for m, name in enumerate(names):
            seq = name.split("_")[0]
            img, lab = rgb(100 * n + m), ids(100 * n + m, [0, 1, 2, 8, 10, 13, 255])
            save_rgb_png(root / "rgb_anon" / cond / split / seq / f"{name}_rgb_anon.png", img)
            gt = root / "gt" / cond / split / seq
            save_gray_png(gt / f"{name}_gt_labelTrainIds.png", lab)
            save_gray_png(gt / f"{name}_gt_labelIds.png", np.full_like(lab, 7))
            save_gray_png(gt / f"{name}_gt_invIds.png", np.zeros_like(lab))
            save_rgb_png(gt / f"{name}_gt_labelColor.png", rgb(7))
            save_rgb_png(root / "rgb_anon" / cond / f"{split}_ref" / seq / f"{name}_ref_rgb_anon.png", img)
            out[f"{cond}_{name}"] = (img, lab)
    return out
