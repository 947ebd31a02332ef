"""The 19 Cityscapes training classes and every dataset's raw-id -> trainId table.

All datasets are mapped to trainIds 0..18 (ignore = 255) once, when shards are written.
A :class:`LabelMap` holds a lookup table *and* the set of raw ids the dataset defines, so
:func:`map_labels` can report ids that are outside the dataset's table (corrupt or foreign
labels) instead of silently mapping them to ignore. class_stats gives a trainId label's class
pixels and its class-uniform centroids (per whole TILE x TILE tile), for the sharder and the views.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_CLASSES = 19
IGNORE = 255
TILE = 1024  # the released class-uniform tile: class centroids are taken per whole TILE x TILE tile

# (trainId, name, Cityscapes labelId, colour): docs/DATA.md, "Label space".
CLASSES: tuple[tuple[int, str, int, tuple[int, int, int]], ...] = (
    (0, "road", 7, (128, 64, 128)),
    (1, "sidewalk", 8, (244, 35, 232)),
    (2, "building", 11, (70, 70, 70)),
    (3, "wall", 12, (102, 102, 156)),
    (4, "fence", 13, (190, 153, 153)),
    (5, "pole", 17, (153, 153, 153)),
    (6, "traffic light", 19, (250, 170, 30)),
    (7, "traffic sign", 20, (220, 220, 0)),
    (8, "vegetation", 21, (107, 142, 35)),
    (9, "terrain", 22, (152, 251, 152)),
    (10, "sky", 23, (70, 130, 180)),
    (11, "person", 24, (220, 20, 60)),
    (12, "rider", 25, (255, 0, 0)),
    (13, "car", 26, (0, 0, 142)),
    (14, "truck", 27, (0, 0, 70)),
    (15, "bus", 28, (0, 60, 100)),
    (16, "train", 31, (0, 80, 100)),
    (17, "motorcycle", 32, (0, 0, 230)),
    (18, "bicycle", 33, (119, 11, 32)),
)
CLASS_NAMES: tuple[str, ...] = tuple(c[1] for c in CLASSES)
PALETTE: np.ndarray = np.array([c[3] for c in CLASSES], dtype=np.uint8)  # (19, 3)
TRAIN_TO_CITYSCAPES_ID: np.ndarray = np.array([c[2] for c in CLASSES], dtype=np.uint8)  # (19,)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

# Official colours of all 34 Cityscapes labelIds (0..33), used as the palette of GTA5-style
# label PNGs. Note the colour collisions (polegroup = pole, 0..4 all black): never decode by colour.
CITYSCAPES_ID_COLOURS: np.ndarray = np.array(
    [(0, 0, 0)] * 5 + [(111, 74, 0), (81, 0, 81), (128, 64, 128), (244, 35, 232), (250, 170, 160),
     (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153), (180, 165, 180),
     (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30),
     (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
     (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230),
     (119, 11, 32)], dtype=np.uint8)  # (34, 3)


@dataclass(frozen=True)
class LabelMap:
    """A raw-id -> trainId table: ``lut[raw]`` is the trainId, ``known[raw]`` says the id exists."""

    name: str
    lut: np.ndarray  # (N,) uint8
    known: np.ndarray  # (N,) bool


def _table(name: str, size: int, pairs: dict[int, int], known_ids) -> LabelMap:
    lut = np.full(size, IGNORE, dtype=np.uint8)
    for raw, train in pairs.items():
        lut[raw] = train
    known = np.zeros(size, dtype=bool)
    known[np.asarray(list(known_ids), dtype=np.int64)] = True
    lut.setflags(write=False)
    known.setflags(write=False)
    return LabelMap(name, lut, known)


# Cityscapes labelIds (also GTA5's palette indices). 255 is accepted as "void" as well.
CITYSCAPES = _table("cityscapes_ids", 256, {c[2]: c[0] for c in CLASSES}, [*range(34), 255])
CITYSCAPES_ID_TO_TRAIN: np.ndarray = CITYSCAPES.lut  # (256,) uint8, unknown -> 255

# SYNTHIA-RAND-CITYSCAPES class ids (16-bit files: the table covers all 65536 values).
SYNTHIA_ID_TO_TRAIN_PAIRS = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11,
                             11: 18, 12: 17, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
SYNTHIA = _table("synthia", 65536, SYNTHIA_ID_TO_TRAIN_PAIRS, range(23))
SYNTHIA_ID_TO_TRAIN: np.ndarray = SYNTHIA.lut  # (65536,) uint8
SYNTHIA_MISSING_CLASSES: tuple[int, ...] = (9, 14, 16)  # terrain, truck, train never occur

# Mapillary Vistas v1.2 (66 ids, 0..65).
_MAPILLARY_ROBUSTNET_PAIRS = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5,
                              48: 6, 50: 7, 30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12,
                              55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}
_MAPILLARY_OPENSEG_PAIRS = {**_MAPILLARY_ROBUSTNET_PAIRS, 7: 0, 8: 0, 10: 0, 14: 0, 23: 0,
                            9: 1, 11: 1, 46: 7, 49: 7, 44: 5}
MAPILLARY_ROBUSTNET = _table("mapillary_robustnet", 256, _MAPILLARY_ROBUSTNET_PAIRS, range(66))
MAPILLARY_OPENSEG = _table("mapillary_openseg", 256, _MAPILLARY_OPENSEG_PAIRS, range(66))
MAPILLARY_TO_TRAIN: np.ndarray = MAPILLARY_ROBUSTNET.lut  # default map
MAPILLARY_MAPS: dict[str, LabelMap] = {"robustnet": MAPILLARY_ROBUSTNET,
                                       "openseg": MAPILLARY_OPENSEG}

# BDD100K labels are trainIds already; anything outside 0..18 and 255 is out of table.
BDD100K = _table("bdd100k_trainids", 256, {i: i for i in range(NUM_CLASSES)},
                 [*range(NUM_CLASSES), IGNORE])

# ACDC's *_gt_labelTrainIds.png: trainIds as well (0..18, 255 ignore).
ACDC = _table("acdc_trainids", 256, {i: i for i in range(NUM_CLASSES)}, [*range(NUM_CLASSES), IGNORE])

LABEL_MAPS: dict[str, LabelMap] = {m.name: m for m in (CITYSCAPES, SYNTHIA, MAPILLARY_ROBUSTNET,
                                                       MAPILLARY_OPENSEG, BDD100K, ACDC)}


def class_stats(label: np.ndarray, tile: int = TILE) -> tuple[dict, dict]:
    """(class_pixels, centroids) of a trainId label; centroids per whole ``tile`` x ``tile`` tile.

    class_pixels: {"c": count}; centroids: {"c": [[y, x], ...]} = integer (floor) centroid of
    class c in every whole tile that contains it, absolute image coordinates, tiles in row-major
    order. As in the released code only whole tiles count: a 1914x1052 GTA5 frame has one tile (top
    left), a frame smaller than a tile none (a class present only outside whole tiles gets []).
    """
    h, w = label.shape
    counts = np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]
    pixels = {str(c): int(counts[c]) for c in np.flatnonzero(counts)}
    cents: dict[str, list[list[int]]] = {k: [] for k in pixels}
    for y0 in range(0, h - tile + 1, tile):
        for x0 in range(0, w - tile + 1, tile):
            t = label[y0:y0 + tile, x0:x0 + tile]
            th, tw = t.shape
            flat = t.ravel()
            n = np.bincount(flat, minlength=256)[:NUM_CLASSES]
            rows = np.repeat(np.arange(th, dtype=np.float64), tw)  # (th*tw,)
            cols = np.tile(np.arange(tw, dtype=np.float64), th)
            sy = np.bincount(flat, weights=rows, minlength=256)[:NUM_CLASSES].astype(np.int64)
            sx = np.bincount(flat, weights=cols, minlength=256)[:NUM_CLASSES].astype(np.int64)
            for c in np.flatnonzero(n):
                cents[str(c)].append([int(y0 + sy[c] // n[c]), int(x0 + sx[c] // n[c])])
    return pixels, cents


def map_labels(raw: np.ndarray, lut: LabelMap | np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Map raw ids to trainIds; return (uint8 trainIds, sorted raw ids outside the table).

    ``lut`` is a :class:`LabelMap` (ids with ``known`` False are reported) or a bare LUT array
    (only ids beyond its length are reported). Out-of-table ids become 255 in the output.
    """
    raw = np.asarray(raw)
    if raw.dtype.kind not in "ui":
        raise TypeError(f"map_labels: raw labels must be an integer array, got {raw.dtype}")
    table, known = (lut.lut, lut.known) if isinstance(lut, LabelMap) else (np.asarray(lut), None)
    if raw.size and int(raw.min()) < 0:
        raise ValueError(f"map_labels: negative label id {int(raw.min())}")
    counts = np.bincount(raw.ravel(), minlength=len(table))
    present = np.flatnonzero(counts)
    in_range = present[present < len(table)]
    unknown = present[present >= len(table)].tolist()
    if known is not None:
        unknown = sorted(in_range[~known[in_range]].tolist() + unknown)
    if unknown:
        safe = np.where(raw < len(table), raw, 0)
        out = table[safe]
        out[raw >= len(table)] = IGNORE
        if known is not None:
            out[~known[safe] | (raw >= len(table))] = IGNORE
    else:
        out = table[raw]
    return out.astype(np.uint8, copy=False), [int(u) for u in unknown]


def colorize(label: np.ndarray) -> np.ndarray:
    """trainIds (H, W) -> RGB (H, W, 3) uint8 with the Cityscapes palette; 255/other -> black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[np.asarray(label, dtype=np.uint8)]


def train_to_cityscapes_ids(train_ids: np.ndarray) -> np.ndarray:
    """trainIds (H, W) -> Cityscapes labelIds (255 -> 0 "unlabeled")."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:NUM_CLASSES] = TRAIN_TO_CITYSCAPES_ID
    return lut[np.asarray(train_ids, dtype=np.uint8)]


def cityscapes_palette_png(label_ids: np.ndarray, path: str | Path | None = None):
    """Make (and optionally save) an 8-bit palette PNG whose index IS the Cityscapes labelId.

    This is the GTA5 label format; the palette holds the official Cityscapes colours.
    Returns the PIL image.
    """
    from PIL import Image

    ids = np.asarray(label_ids)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise ValueError(f"cityscapes_palette_png: need a 2-D uint8 array of labelIds, "
                         f"got shape {ids.shape} dtype {ids.dtype}")
    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(CITYSCAPES_ID_COLOURS)] = CITYSCAPES_ID_COLOURS
    img.putpalette(pal.ravel().tolist())
    if path is not None:
        img.save(path, format="PNG", optimize=False)
    return img
