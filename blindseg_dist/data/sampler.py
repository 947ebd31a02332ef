"""Class-uniform epochs built from the shard manifest (docs/DATA.md, "Class-uniform sampling").

An epoch of N items (N = samples in the manifest) holds ``N - 19 k`` images drawn uniformly without
replacement plus, for every class c that has centroids, ``k = int(N * pct / 19)`` (image, centroid)
pairs drawn from the list of *all* pairs of class c in the dataset (shuffled, wrapping around when
the list is shorter than k). Centroids are per whole ``tile`` x ``tile`` tile of the trainId map.
Everything here is a pure function of (table, pct, seed, epoch): the partition over ranks and loader
workers and the order inside one stream are computed from the manifest alone, before any tar is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .labels import NUM_CLASSES, TILE

# one epoch item: sample index, class (-1: uniform draw), centroid (-1, -1 for none), per-item seed
ITEM = np.dtype([("sample", np.int64), ("cls", np.int16), ("cy", np.int32), ("cx", np.int32),
                 ("seed", np.uint64)])

_TAG_EPOCH, _TAG_SHARDS, _TAG_ORDER = 0xE90C, 0x5A4D, 0x0DE5


def whole_tile_centroids(centroids: Mapping[str, Sequence], size: Sequence[int], tile: int = TILE) -> dict[int, list]:
    """{class: [(y, x), ...]} keeping only centroids that lie in a whole ``tile`` x ``tile`` tile.

    A tile's centroid lies inside its tile, so this also turns centroids of an older manifest that
    included the partial tiles at the right and bottom edges into exactly the whole-tile set."""
    h, w = int(size[0]), int(size[1])
    ny, nx = h // tile, w // tile
    out: dict[int, list] = {}
    for k, pts in (centroids or {}).items():
        keep = [(int(y), int(x)) for y, x in pts if int(y) // tile < ny and int(x) // tile < nx]
        if keep:
            out[int(k)] = keep
    return out


@dataclass
class SampleTable:
    """What the sampler needs from a manifest: where each sample lives and the centroid pairs."""

    shards: list[str]  # shard locations, manifest order
    keys: list[str]  # sample keys, in shard order
    shard: np.ndarray  # (N,) int64 shard index of each sample
    pos: np.ndarray  # (N,) int64 position of each sample inside its shard
    pairs: list[np.ndarray]  # per class: (n_c, 3) int64 rows [sample, cy, cx]
    tile: int = TILE

    @classmethod
    def from_samples(cls, shards: Sequence[str], samples: Sequence[Mapping], tile: int = TILE) -> "SampleTable":
        """samples: dicts with "key", "shard" (index into shards), "size" and "centroids"
        ({"<c>": [[y, x], ...]}), in shard order."""
        keys, shard, pos, per_class = [], [], [], [[] for _ in range(NUM_CLASSES)]
        count: dict[int, int] = {}
        for i, s in enumerate(samples):
            si = int(s["shard"])
            keys.append(str(s["key"]))
            shard.append(si)
            pos.append(count.get(si, 0))
            count[si] = count.get(si, 0) + 1
            for c, pts in whole_tile_centroids(s.get("centroids") or {}, s["size"], tile).items():
                if 0 <= c < NUM_CLASSES:
                    per_class[c].extend((i, y, x) for y, x in pts)
        pairs = [np.asarray(p, dtype=np.int64).reshape(-1, 3) for p in per_class]
        return cls(list(shards), keys, np.asarray(shard, np.int64), np.asarray(pos, np.int64), pairs, int(tile))

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def per_class(self, pct: float) -> int:
        """k = int(N * pct / 19): items of every class that has centroids."""
        return int(self.num_samples * pct / NUM_CLASSES)

    def epoch_size(self, pct: float) -> int:
        k = self.per_class(pct)
        return self.num_samples - NUM_CLASSES * k + k * sum(1 for p in self.pairs if len(p))


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) % 2**63 for w in words]))


def _draw(n: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """num indices into a list of n: a random permutation, wrapped around when num > n."""
    return rng.permutation(n)[np.arange(num) % n]


def build_epoch(table: SampleTable, pct: float, seed: int, epoch: int) -> np.ndarray:
    """The epoch's items (ITEM array): N - 19k uniform draws, then k per class with centroids."""
    if not 0.0 <= pct <= 1.0:
        raise ValueError(f"class-uniform fraction must be in [0, 1], got {pct}")
    rng = _rng(seed, epoch, _TAG_EPOCH)
    n, k = table.num_samples, table.per_class(pct)
    n_rand = n - NUM_CLASSES * k
    parts = []
    uni = np.zeros(n_rand, ITEM)
    uni["sample"], uni["cls"], uni["cy"], uni["cx"] = _draw(n, n_rand, rng) if n_rand else [], -1, -1, -1
    parts.append(uni)
    for c in range(NUM_CLASSES):
        pairs = table.pairs[c]
        if k == 0 or len(pairs) == 0:
            continue
        sel = pairs[_draw(len(pairs), k, rng)]
        it = np.zeros(k, ITEM)
        it["sample"], it["cls"], it["cy"], it["cx"] = sel[:, 0], c, sel[:, 1], sel[:, 2]
        parts.append(it)
    items = np.concatenate(parts)
    items["seed"] = rng.integers(0, 2**63, size=len(items), dtype=np.uint64)
    return items


def repeats(table: SampleTable, pct: float, streams: int, batch_size: int, epoch_batches: int | None) -> int:
    """How many consecutive epochs one stream epoch spans: 1, unless one epoch holds fewer items than
    ``streams x batch_size x epoch_batches`` (tiny data sets, many ranks)."""
    m = table.epoch_size(pct)
    if m == 0:
        raise ValueError("the shard manifest lists no sample: nothing to train on")
    return max(1, math.ceil(streams * batch_size * (epoch_batches or 1) / m))


def stream_slice(table: SampleTable, pct: float, seed: int, stream_epoch: int, repeat: int, streams: int,
                 per_stream: int, g: int) -> np.ndarray:
    """The items of stream g (of ``streams``) in stream epoch E, grouped by shard in shard order.

    The pool (``repeat`` consecutive epochs) is ordered by (a seeded permutation of the shards,
    position inside the shard) and cut into contiguous blocks of ``per_stream`` items: every stream
    reads a few whole shards (at most two shards are shared between neighbouring streams), each
    front to back; blocks never overlap and the ``len(pool) - streams x per_stream`` last items are
    dropped (drop_last)."""
    pool = np.concatenate([build_epoch(table, pct, seed, stream_epoch * repeat + r) for r in range(repeat)])
    if streams * per_stream > len(pool):
        raise ValueError(f"{streams} streams x {per_stream} items exceed the {len(pool)} items of an epoch")
    perm = _rng(seed, stream_epoch, _TAG_SHARDS).permutation(len(table.shards))
    order = np.lexsort((np.arange(len(pool)), table.pos[pool["sample"]], perm[table.shard[pool["sample"]]]))
    return pool[order[g * per_stream:(g + 1) * per_stream]]


def stream_order(items: np.ndarray, table: SampleTable, seed: int, stream_epoch: int, g: int,
                 open_shards: int = 4, buffer: int = 16) -> np.ndarray:
    """Emission order of one stream's (shard-grouped) items: ``open_shards`` shards are open at a
    time and drawn from at random into a shuffle buffer of ``buffer`` items; returns the items
    permuted. Items of one shard are still *read* front to back (the reader caches the few that are
    passed before they are emitted)."""
    rng = _rng(seed, stream_epoch, g, _TAG_ORDER)
    sh = table.shard[items["sample"]]
    cuts = np.flatnonzero(np.diff(sh)) + 1
    runs = [list(r) for r in np.split(np.arange(len(items)), cuts)] if len(items) else []
    runs = [r[::-1] for r in runs]  # pop() from the end = front to back
    nxt, open_runs, buf, out = 0, [], [], []
    while len(out) < len(items):
        while len(buf) < buffer and (open_runs or nxt < len(runs)):
            while len(open_runs) < open_shards and nxt < len(runs):
                open_runs.append(runs[nxt])
                nxt += 1
            r = int(rng.integers(len(open_runs)))
            buf.append(open_runs[r].pop())
            if not open_runs[r]:
                open_runs.pop(r)
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return items[np.asarray(out, dtype=np.int64)] if out else items
