"""`blindseg browse`: look at what the training loader feeds (docs/DATA.md, "Looking at the stream").

The batches come from ``data.stream.train_loader_from_config``, the trainer's own call, with
``info=True``: the same epoch, the same crops, the same views as training step 0 of rank
``--rank`` of ``--world-size``. Writes ``DIR/grid.png`` (one row per sample: original view,
augmented view, label; the class-uniform class and centroid marked) and ``DIR/samples.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import atomic
from ..data.labels import CLASS_NAMES, colorize
from ..data.stream import train_loader_from_config
from ..data.views import IMAGENET_MEAN, IMAGENET_STD

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _to_rgb(x: torch.Tensor) -> np.ndarray:
    """A normalized (3, H, W) view -> uint8 (H, W, 3)."""
    return (((x * _STD + _MEAN).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).copy()


def centroid_in_crop(info: dict) -> tuple[float, float] | None:
    """The class-uniform centroid of a sample in crop pixels (x, y), or None for a uniform draw."""
    if info["centroid"] is None:
        return None
    g = info["geometry"]
    cx, cy = info["centroid"]
    hs, ws = g["scaled_hw"]
    h, w = g["source_hw"]
    cys, cxs = min(int(cy * hs / h), hs - 1), min(int(cx * ws / w), ws - 1)
    u = cxs - g["x0"]
    if g["flip"]:
        u = g["cw"] - 1 - u
    return float(u + g["px"]), float(cys - g["y0"] + g["py"])


def _row(batch_x, batch_xa, batch_y, info: dict, tile: int) -> np.ndarray:
    views = [_to_rgb(batch_x), _to_rgb(batch_xa), colorize(batch_y.numpy().astype(np.uint8))]
    c = views[0].shape[0]
    views = [cv2.resize(v, (tile, tile), interpolation=cv2.INTER_AREA if i < 2 else cv2.INTER_NEAREST)
             for i, v in enumerate(views)]
    mark = centroid_in_crop(info)
    text = f"{info['key']}  " + (f"class {info['class']} {CLASS_NAMES[info['class']]}" if info["class"] is not None
                                 else "uniform")
    for v in views:
        if mark is not None:
            p = (int(round(mark[0] * tile / c)), int(round(mark[1] * tile / c)))
            cv2.drawMarker(v, p, (255, 255, 255), cv2.MARKER_CROSS, max(8, tile // 10), 3)
            cv2.drawMarker(v, p, (255, 0, 255), cv2.MARKER_CROSS, max(8, tile // 10), 1)
    cv2.putText(views[0], text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(views[0], text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate(views, axis=1)


def browse(cfg, num: int, out: str | Path, *, rank: int = 0, world_size: int = 1, tile: int = 256) -> list[dict]:
    """Write DIR/grid.png and DIR/samples.jsonl for the first ``num`` training samples; returns
    the jsonl records ({"key", "class", "centroid": [x, y] | None, "crop": [x1, y1, x2, y2], "scale",
    "flip"}, centroid and crop in source-image pixels)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if tile < 16:
        raise ValueError(f"--tile must be >= 16, got {tile}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = train_loader_from_config(cfg, rank=rank, world_size=world_size, info=True)
    rows, records = [], []
    it = iter(loader)
    while len(records) < num:
        batch = next(it)
        for k, info in enumerate(batch["info"]):
            if len(records) == num:
                break
            records.append({f: info[f] for f in ("key", "class", "centroid", "crop", "scale", "flip")})
            rows.append(_row(batch["image"][k], batch["image_aug"][k], batch["label"][k], info, tile))
    del it, loader
    grid = np.concatenate(rows, axis=0)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the grid PNG")
    atomic.write_bytes(out / "grid.png", png.tobytes())
    atomic.write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records
