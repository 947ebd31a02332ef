"""Readers for the datasets as users download them; ``get_source(name, root, split)``."""
from __future__ import annotations

import os

from .acdc import open_acdc
from .base import Decoded, Item, LayoutError, SampleError, Source, read_rgb
from .bdd100k import open_bdd100k
from .cityscapes import open_cityscapes
from .gta5 import open_gta5
from .hf import open_hf
from .mapillary import open_mapillary
from .synthia import open_synthia

OPENERS = {"gta5": open_gta5, "cityscapes": open_cityscapes, "bdd100k": open_bdd100k,
           "mapillary": open_mapillary, "synthia": open_synthia, "hf": open_hf, "acdc": open_acdc}
DEFAULT_SPLITS = {"gta5": "all", "cityscapes": "val", "bdd100k": "val", "mapillary": "val",
                  "synthia": "val", "hf": None, "acdc": "val"}
TARGETS = ("cityscapes", "bdd100k", "mapillary", "synthia", "acdc")  # unseen domains: the default is their evaluation split


def get_source(name: str, root: str, split: str | None = None, **opts) -> Source:
    """Open dataset ``name`` at ``root``; ``split`` defaults per dataset (see DEFAULT_SPLITS).

    ``opts``: ``label_map`` ("robustnet" | "openseg") for mapillary; for hf (a local Hugging Face
    dataset) ``label_map`` (trainids | cityscapes_ids | ...), ``image_column``, ``label_column``,
    ``key_column`` (see data/sources/hf.py); ``condition`` (fog | night | rain | snow | all) for acdc.
    """
    if name not in OPENERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(OPENERS)}")
    if not os.path.isdir(root):
        raise LayoutError(f"{name}: root folder {root!r} does not exist; pass the folder that "
                          f"holds the dataset as downloaded")
    return OPENERS[name](str(root), split or DEFAULT_SPLITS[name], **opts)


def detect_dataset(root: str) -> str | None:
    """The dataset whose download layout ``root`` has (the readers' EXPECTED layouts), or None:
    cityscapes (leftImg8bit/), gta5 (images/ + labels/ of PNGs), bdd100k (seg/ or images/10k/),
    mapillary (training/ or validation/ with images/), acdc (rgb_anon/ + gt/), synthia (RGB/ + GT/, or
    RAND_CITYSCAPES/)."""
    from pathlib import Path

    r = Path(root)
    if not r.is_dir():
        return None
    if (r / "leftImg8bit").is_dir() or (r / "leftImg8bit_trainvaltest").is_dir():
        return "cityscapes"
    if (r / "seg" / "images").is_dir() or (r / "images" / "10k").is_dir() or (r.name == "seg" and (r / "labels").is_dir()):
        return "bdd100k"
    if any((r / d / "images").is_dir() for d in ("training", "validation")):
        return "mapillary"
    if (r / "rgb_anon").is_dir() and (r / "gt").is_dir():
        return "acdc"
    if ((r / "RGB").is_dir() and (r / "GT").is_dir()) or (r / "RAND_CITYSCAPES").is_dir():
        return "synthia"
    if (r / "images").is_dir() and (r / "labels").is_dir():
        return "gta5"
    return None


__all__ = ["detect_dataset", "get_source", "Source", "Item", "Decoded", "SampleError", "LayoutError", "read_rgb",
           "OPENERS", "DEFAULT_SPLITS"]
