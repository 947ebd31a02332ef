"""Tiny shards in the sample schema of docs/DATA.md, "Shards", written with tarfile, for the stream/evalset tests
(independent of data/shards.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np

from blindseg_dist.data.views import class_centroids


def make_frame(h: int, w: int, seed: int, classes=(0, 2, 8, 10, 13)):
    """A frame of constant-colour rectangles: (image uint8 HxWx3 RGB, label uint8 HxW)."""
    rng = np.random.default_rng(seed)
    label = np.full((h, w), classes[0], np.uint8)
    for c in classes[1:]:
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        label[y0:y0 + int(rng.integers(4, h // 2 + 5)), x0:x0 + int(rng.integers(4, w // 2 + 5))] = c
    label[:2, :3] = 255
    lut = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image = lut[label]
    return np.ascontiguousarray(image), label


def _png(arr: np.ndarray) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _add(tf: tarfile.TarFile, name: str, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_tiny_shards(out_dir, n: int = 12, per_shard: int = 4, hw=(40, 56), seed: int = 0,
                      prefix: str = "train", sizes=None, tile: int = 1024):
    """Write n samples into ceil(n / per_shard) tars plus manifest.json; returns (manifest, frames)
    where frames[key] = (image, label). sizes: optional per-sample (h, w); tile: the centroid tile
    (whole tiles only; small, e.g. 16, to get class-uniform items on tiny frames)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames, shards, samples = {}, [], []
    for s in range(0, n, per_shard):
        name = f"{prefix}-{s // per_shard:06d}.tar"
        with tarfile.open(out / name, "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                key = f"img_{i:05d}"
                h, w = sizes[i] if sizes else hw
                image, label = make_frame(h, w, seed * 1000 + i)
                frames[key] = (image, label)
                cp = {str(int(c)): int((label == c).sum()) for c in np.unique(label) if c != 255}
                meta = {"key": key, "size": [h, w], "class_pixels": cp, "centroids": class_centroids(label, tile)}
                _add(tf, f"{key}.image.png", _png(image))
                _add(tf, f"{key}.label.png", _png(label))
                _add(tf, f"{key}.meta.json", json.dumps(meta).encode())
                samples.append({"key": key, "shard": name, "size": [h, w], "class_pixels": cp,
                                "centroids": meta["centroids"]})
        shards.append({"name": name, "count": min(n, s + per_shard) - s,
                       "bytes": (out / name).stat().st_size, "sha256": ""})
    manifest = {"format": "blindseg-shards/1", "tool_version": "test", "dataset": "tiny", "split": prefix,
                "label_map": "trainid", "image_format": "png", "num_samples": n, "centroid_tile": tile, "shards": shards,
                "samples": samples, "skipped": [], "warnings": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest, frames
