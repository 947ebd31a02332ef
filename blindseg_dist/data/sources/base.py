"""Common reader machinery: items, decoding, split lists, clear layout errors."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import cv2
import numpy as np
from PIL import Image

from ..labels import LabelMap, map_labels

SPLITS_DIR = Path(__file__).resolve().parent.parent / "splits"


class SampleError(Exception):
    """A pair that cannot be used (unreadable file, size mismatch); the sharder skips it."""


class LayoutError(FileNotFoundError):
    """A dataset folder that matches none of the accepted layouts."""


class Item(NamedTuple):
    """One image/label pair on disk."""

    key: str
    image_path: str
    label_path: str


class Decoded(NamedTuple):
    """A decoded pair: RGB image, trainIds, raw ids outside the dataset's table."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8 trainIds, 255 ignore
    unknown_ids: list[int]


def sanitize_key(key: str) -> str:
    """WebDataset-safe key: no '.' (field separator) and no '/'."""
    return key.replace("/", "_").replace(".", "_")


@dataclass
class Source:
    """A dataset split on disk: ``items`` (sorted by key) and the decoding rules.

    ``skipped`` lists pairs already rejected while listing (e.g. an image without a label),
    ``warnings`` notes worth copying into a manifest.
    """

    name: str
    root: str
    split: str
    label_map: LabelMap
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def label_map_name(self) -> str:
        return self.label_map.name

    def read_raw_label(self, path: str) -> np.ndarray:
        """Raw label ids (H, W) of one file; 8-bit single-channel or palette (index) PNG."""
        return read_index_png(path)

    def decode(self, item: Item) -> Decoded:
        """Read and map one pair; raises :class:`SampleError` when it cannot be used."""
        image = read_rgb(item.image_path)
        raw = self.read_raw_label(item.label_path)
        if image.shape[:2] != raw.shape[:2]:
            raise SampleError(f"size mismatch: image {item.image_path} is "
                              f"{image.shape[0]}x{image.shape[1]} (HxW) but label "
                              f"{item.label_path} is {raw.shape[0]}x{raw.shape[1]}")
        label, unknown = map_labels(raw, self.label_map)
        return Decoded(image, label, unknown)

    def load_pair(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 HxWx3 RGB, label uint8 HxW trainIds); out-of-table ids become 255."""
        d = self.decode(item)
        return d.image, d.label


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); raises SampleError if unreadable."""
    data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        raise SampleError(f"unreadable image: {path}")
    return np.ascontiguousarray(img[..., ::-1])


def read_index_png(path: str) -> np.ndarray:
    """Raw ids of an 8-bit label PNG: palette images give their indices (never colours)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise SampleError(f"label {path} has mode {im.mode}: expected a single-channel "
                                  "or palette PNG of ids (colour-coded labels are not decoded)")
            arr = np.array(im)
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise SampleError(f"unreadable label: {path} ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise SampleError(f"label {path} is not single-channel (shape {arr.shape})")
    return arr


def read_split_list(split: str, shipped: dict[str, str]) -> tuple[str, list[str] | None]:
    """Resolve a split: a shipped list name, 'all' (None = everything) or a user list file.

    Returns (split name for the manifest, file stems or None).
    """
    if split == "all":
        return "all", None
    if split in shipped:
        path = SPLITS_DIR / shipped[split]
    else:
        path = Path(split)
        if not path.is_file():
            raise ValueError(f"split {split!r} is neither one of {sorted(shipped) + ['all']} "
                             f"nor an existing list file")
    names = [ln.strip() for ln in path.read_text().splitlines()]
    stems = [os.path.splitext(os.path.basename(n))[0] for n in names if n and not n.startswith("#")]
    return (split if split in shipped else path.stem), stems


def first_dir(candidates: list[Path]) -> Path | None:
    """The first existing directory of ``candidates``."""
    return next((c for c in candidates if c.is_dir()), None)


def layout_error(dataset: str, root: str, expected: list[str], hint: str = "") -> LayoutError:
    """A clear error: which folder is missing and which layouts are accepted."""
    lines = "\n  ".join(expected)
    return LayoutError(f"{dataset}: no accepted layout found under {root!r}. Expected one of:"
                       f"\n  {lines}\n{hint}Point the root at the folder that holds these.")


def check_not_empty(src: Source, where: str) -> Source:
    """Raise when listing found nothing (an empty split is always a setup mistake)."""
    if not src.items:
        raise LayoutError(f"{src.name}: split {src.split!r} has no usable pairs under {where} "
                          f"({len(src.skipped)} skipped: "
                          f"{src.skipped[0]['reason'] if src.skipped else 'no files'}).")
    return src


def select_stems(src: Source, by_stem: dict, stems, where) -> dict:
    """Keep the split list's ``stems`` that exist in ``by_stem`` (all when ``stems`` is None); a
    listed file that is missing becomes a warning of ``src`` (copied into the manifest)."""
    if stems is None:
        return by_stem
    missing = [s for s in stems if s not in by_stem]
    if missing:
        src.warnings.append(f"{src.name}: {len(missing)} of {len(stems)} files of split "
                            f"{src.split!r} are not in {where} (first: {missing[0]})")
    return {s: by_stem[s] for s in stems if s in by_stem}

