"""A local Hugging Face ``datasets`` dataset as a source (docs/DATA.md, "Hugging Face datasets").

Accepted: a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then
``split`` picks the member), or a folder of parquet files (``*.parquet`` anywhere below it; files
named ``<split>-*.parquet`` or under a ``<split>/`` folder are taken for that split when present).
Rows need an image column and a label column: ``datasets.Image`` features, encoded bytes
(``{"bytes": ...}``) or arrays. Labels are single-channel id maps (8/16-bit, palette indices,
never colours) mapped with ``label_map``: ``trainids`` (already 0..18 / 255, the default),
``cityscapes_ids``, or any name of ``data.labels.LABEL_MAPS``. Nothing is downloaded.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from ..labels import BDD100K, LABEL_MAPS, LabelMap, map_labels
from .base import Decoded, Item, LayoutError, SampleError, Source, check_not_empty, sanitize_key

TRAIN_IDS = LabelMap("trainids", BDD100K.lut, BDD100K.known)  # labels that are trainIds already


def hf_label_map(name: str) -> LabelMap:
    if name == "trainids":
        return TRAIN_IDS
    if name in LABEL_MAPS:
        return LABEL_MAPS[name]
    raise ValueError(f"hf: unknown label map {name!r}; choose trainids or one of {sorted(LABEL_MAPS)}")


def _load(root: Path, split: str | None):
    import datasets

    if (root / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(root))
        names = list(dd)
        pick = split or ("train" if "train" in dd else names[0])
        if pick not in dd:
            raise ValueError(f"hf: split {pick!r} is not in {root} (it holds {names}); pass --split NAME")
        return dd[pick], pick
    if (root / "dataset_info.json").is_file() and (root / "state.json").is_file():
        return datasets.load_from_disk(str(root)), split or "all"
    files = sorted(str(p) for p in root.rglob("*.parquet"))
    if not files:
        raise LayoutError(f"hf: {root} is neither a save_to_disk folder (dataset_info.json + state.json, or "
                          f"dataset_dict.json) nor a folder of *.parquet files")
    if split and split != "all":
        chosen = [f for f in files if re.search(rf"(^|[/_-]){re.escape(split)}([/_.-]|$)", f[len(str(root)):])]
        if not chosen:
            raise ValueError(f"hf: no parquet file of split {split!r} under {root} (files: {files[:3]}...)")
        files = chosen
    return datasets.Dataset.from_parquet(files), split or "all"  # arrow cache: the datasets cache folder


def _array(value, what: str, key: str, rgb: bool) -> np.ndarray:
    """A cell of an image/label column -> numpy (RGB uint8 for images, the raw ids for labels)."""
    from PIL import Image

    if isinstance(value, dict) and value.get("bytes") is not None:
        value = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        value = Image.open(value["path"])
    if isinstance(value, Image.Image):
        if rgb:
            return np.ascontiguousarray(np.array(value.convert("RGB")))
        if value.mode not in ("P", "L", "I", "I;16"):
            raise SampleError(f"{key}: {what} has mode {value.mode}: expected a single-channel or palette id "
                              f"map (colour-coded labels are not decoded)")
        return np.array(value)
    arr = np.asarray(value)
    if arr.dtype == object:
        raise SampleError(f"{key}: {what} is not an image or an array ({type(value).__name__})")
    if rgb:
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise SampleError(f"{key}: {what} array has shape {arr.shape}, expected HxWx3")
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    if arr.ndim != 2:
        raise SampleError(f"{key}: {what} array has shape {arr.shape}, expected HxW ids")
    return arr


class HFSource(Source):
    """Rows of a local Hugging Face dataset; ``items[i].image_path`` is ``hf:<row>``."""

    def __init__(self, root: str, split: str | None = None, *, image_column: str = "image",
                 label_column: str = "label", key_column: str | None = None, label_map: str = "trainids"):
        ds, split_name = _load(Path(root), split)
        super().__init__("hf", str(root), split_name, hf_label_map(label_map))
        missing = [c for c in (image_column, label_column, key_column) if c and c not in ds.column_names]
        if missing:
            raise ValueError(f"hf: column(s) {missing} not in {root} (columns: {ds.column_names}); pass "
                             f"--image-column / --label-column / --key-column")
        self.image_column, self.label_column = image_column, label_column
        self._ds = ds
        keys = ds[key_column] if key_column else [f"{i:08d}" for i in range(len(ds))]
        seen = set()
        for i, k in enumerate(keys):
            key = sanitize_key(str(k))
            if key in seen:
                self.skipped.append({"key": key, "reason": f"duplicate key (row {i})"})
                continue
            seen.add(key)
            self.items.append(Item(key, f"hf:{i}", f"hf:{i}"))
        self.items.sort(key=lambda it: it.key)
        check_not_empty(self, root)

    def decode(self, item: Item) -> Decoded:
        row = self._ds[int(item.image_path[3:])]
        image = _array(row[self.image_column], "image", item.key, rgb=True)
        raw = _array(row[self.label_column], "label", item.key, rgb=False)
        if image.shape[:2] != raw.shape[:2]:
            raise SampleError(f"size mismatch: image of {item.key} is {image.shape[0]}x{image.shape[1]} (HxW) "
                              f"but its label is {raw.shape[0]}x{raw.shape[1]}")
        if raw.dtype.kind not in "ui" or (raw.size and int(raw.min()) < 0):
            raise SampleError(f"{item.key}: label holds {raw.dtype} values (min {raw.min()}); expected "
                              f"non-negative integer ids")
        label, unknown = map_labels(raw, self.label_map)
        return Decoded(image, label, unknown)


def open_hf(root: str, split: str | None = None, **opts) -> Source:
    return HFSource(root, split, **opts)
