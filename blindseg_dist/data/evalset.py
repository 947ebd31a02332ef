"""Map-style evaluation data over a shard directory or a raw folder (docs/DATA.md, "Evaluation data";
the split over ranks: docs/DISTRIBUTED.md, "Streaming").

Items are full-resolution frames {"image": float32 (3,H,W) normalized, "label": int64 (H,W),
"key": str}. A rank evaluates shard_indices(len(ds), rank, world): a contiguous split without
padding or dropping, so summing the per-rank confusion matrices gives the 1-rank result exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from blindseg_dist.data.location import (RemoteOptions, ShardFiles, ShardReadError, has_braces, holds_shards, image_ext,
                                         index_shard, is_remote, resolve, shard_name)
from blindseg_dist.data.stream import decode_image, decode_label
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.data.views import normalize, resize_bicubic, to_unit_float

Protocol = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The indices of `rank` out of range(n): contiguous blocks, the first n % world ranks one
    longer; no padding, no dropping, every index exactly once over all ranks."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"need n >= 0, world >= 1, 0 <= rank < world; got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def mapillary_protocol(height: int = 1536, crop: bool = True) -> Protocol:
    """Resize so the height is `height` (PIL bicubic image, antialiased; nearest label); then, with crop=True, a
    centre crop height x height, padding narrow frames with 0 (image) and 255 = ignore (label)."""

    def apply(image: np.ndarray, label: np.ndarray):
        h, w = label.shape
        nw = max(1, int(w / h * height))  # the released ResizeHeight: int(w / h * target_h)
        image = resize_bicubic(image, (height, nw))  # PIL's bicubic: antialiased when shrinking
        label = cv2.resize(label, (nw, height), interpolation=cv2.INTER_NEAREST_EXACT)
        if not crop:
            return image, label
        if nw >= height:
            x0 = int(round((nw - height) / 2.0))  # the released CenterCrop offset
            return image[:, x0:x0 + height], label[:, x0:x0 + height]
        px = (height - nw) // 2
        img_o = np.zeros((height, height, 3), np.uint8)
        lab_o = np.full((height, height), IGNORE, np.uint8)
        img_o[:, px:px + nw] = image
        lab_o[:, px:px + nw] = label
        return img_o, lab_o

    apply.__name__ = f"mapillary_protocol_{height}{'_crop' if crop else ''}"
    return apply


def resolve_protocol(protocol: str | Protocol | None) -> Protocol | None:
    """A protocol callable, or a name: "mapillary_<height>" (e.g. mapillary_1536, mapillary_1024)
    -> mapillary_protocol(height); "full", "synthia", "acdc" and None -> no transform (full resolution)."""
    if protocol is None or callable(protocol):
        return protocol
    name = str(protocol)
    if name in ("full", "synthia", "acdc"):
        return None
    if name.startswith("mapillary_") and name[len("mapillary_"):].isdigit():
        return mapillary_protocol(int(name[len("mapillary_"):]))
    raise ValueError(f"unknown evaluation protocol {name!r}; use full, synthia, mapillary_<height> "
                     f"(e.g. mapillary_1536) or a callable (image, label) -> (image, label)")


class EvalDataset(Dataset):
    """Evaluation frames from a shard directory (or tar list), or from a raw folder via `source`.

    source: any object with an `items` list of (key, image_path, label_path) and
    `load_pair(item) -> (image uint8 HxWx3 RGB, label uint8 HxW[, unknown_ids])` (data/sources).
    protocol: optional (image, label) -> (image, label) on uint8 arrays, before normalization,
    e.g. mapillary_protocol(1536), or its name (see resolve_protocol).

    path may also be a remote location (http(s)://, pipe:CMD, s3://, ..., or a brace pattern; see
    data/location.py): its manifest lists the samples, and each shard is downloaded into the
    verified local cache (``remote``: retries, timeout, cache folder and size) when a sample of it
    is first read, so a rank fetches only the shards of its own slice.
    """

    def __init__(self, path=None, *, source=None, protocol: str | Protocol | None = None,
                 remote: RemoteOptions | None = None):
        self.protocol = resolve_protocol(protocol)
        self.source = source
        self._files = ShardFiles()
        self._remote = None
        if source is not None:
            if not hasattr(source, "items") or not hasattr(source, "load_pair"):
                raise TypeError(f"source must have `items` and `load_pair(item)`, got {type(source).__name__}")
            self._items = list(source.items)
            return
        if path is None:
            raise ValueError("EvalDataset needs a shard directory or tar list, or source=get_source(...)")
        if is_remote(path) or (isinstance(path, str) and has_braces(path)):
            self._init_location(path, remote or RemoteOptions())
            return
        p = Path(path) if not isinstance(path, (list, tuple)) else None
        if p is not None and p.is_dir() and not holds_shards(p):
            raise FileNotFoundError(f"{p} holds no shards (manifest.json or *.tar); for a raw dataset folder pass "
                                    f"source=blindseg_dist.data.sources.get_source(name, root, split)")
        found = resolve(path)
        self._items = []  # (shard path, key, members), indexed once from the tar headers
        for sp in found.urls:
            samples, error = index_shard(sp, found.counts.get(sp))
            if error is not None:
                raise RuntimeError(f"corrupt evaluation shard {sp}: {error}; rewrite it with the sharder "
                                   f"(evaluation never skips samples)")
            self._items.extend((sp, key, members) for key, members in samples)
        keys = [it[1] for it in self._items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate sample keys in {path}; each shard set must hold every frame once")

    def _init_location(self, path, remote: RemoteOptions) -> None:
        ss = resolve(path, retries=remote.retries, timeout=remote.timeout)
        self._remote = {"options": remote, "cache": remote.cache(), "set": ss, "index": {}}
        name_of = {shard_name(u): u for u in ss.urls}
        if ss.manifest is not None and ss.manifest.get("samples") and \
                {s["shard"] for s in ss.manifest["samples"]} >= set(name_of):
            self._items = [(name_of[s["shard"]], s["key"], None) for s in ss.manifest["samples"]
                           if s["shard"] in name_of]
        else:  # no per-sample list: fetch and index every shard now
            self._items = [(u, key, None) for u in ss.urls for key in self._index(u)]
        keys = [it[1] for it in self._items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate sample keys in {path}; each shard set must hold every frame once")

    def _index(self, url: str) -> dict:
        """{key: members} of a remote shard, after fetching it into the cache (once per process)."""
        r = self._remote
        if url not in r["index"]:
            ss, opt = r["set"], r["options"]
            try:
                local = r["cache"].fetch(url, sha256=ss.sha256.get(url), size=ss.sizes.get(url),
                                         retries=opt.retries, timeout=opt.timeout)
            except ShardReadError as e:
                raise RuntimeError(f"evaluation shard {url} cannot be read: {e} (evaluation never skips samples)") \
                    from None
            samples, error = index_shard(local, ss.counts.get(url))
            if error is not None:
                raise RuntimeError(f"corrupt evaluation shard {url}: {error}; rewrite it with the sharder "
                                   f"(evaluation never skips samples)")
            r["index"][url] = (local, dict(samples))
        return r["index"][url][1]

    def __len__(self) -> int:
        return len(self._items)

    def key(self, i: int) -> str:
        return str(self._items[i][0]) if self.source is not None else self._items[i][1]

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(image uint8 HxWx3 RGB, label uint8 HxW, key) before the protocol."""
        item = self._items[i]
        if self.source is not None:
            out = self.source.load_pair(item)
            return out[0], out[1], str(item[0])
        sp, key, members = item
        if members is None:  # a remote shard: read from its cached copy
            if sp in self._remote["index"] and not Path(self._remote["index"][sp][0]).is_file():
                del self._remote["index"][sp]  # evicted from the cache since: fetch it again
            members = self._index(sp).get(key)
            if members is None:
                raise RuntimeError(f"evaluation shard {sp} holds no sample {key!r} although its manifest lists it; "
                                   f"rewrite the shards")
            sp = self._remote["index"][sp][0]
        image = decode_image(self._files.read(sp, *members[image_ext(members)]))
        label = decode_label(self._files.read(sp, *members["label.png"]))
        if label.shape != image.shape[:2]:
            raise ValueError(f"{sp}: sample {key!r} has label {label.shape} and image {image.shape[:2]}")
        return image, label, key

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self._items):
            raise IndexError(f"index {i} out of range for {len(self._items)} samples")
        image, label, key = self.load_raw(i)
        if self.protocol is not None:
            image, label = self.protocol(image, label)
        return {"image": normalize(to_unit_float(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
                "key": key}
