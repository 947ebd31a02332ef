"""Infinite, deterministic, resumable training stream over WebDataset shards (docs/DISTRIBUTED.md,
"Streaming"; the sampler: docs/DATA.md, "Class-uniform sampling").

Design (no webdataset shuffle buffers, so every batch is a pure function of its global step):
- What an epoch holds comes from the shard manifest alone (data/sampler.py): N - 19k uniform draws
  plus k (image, centroid) pairs of every class with centroids, the released class-uniform epoch,
  deterministic per (seed, epoch) and independent of the number of ranks and workers.
- Each rank owns one stream per DataLoader worker; stream g = rank x workers + v. A stream epoch
  E takes a contiguous block of the epoch ordered by (seeded shard permutation, position in the
  shard): blocks never overlap, each stream reads a few whole shards front to back, and every
  stream yields exactly `epoch_batches` full batches (batching happens in the worker, so the
  DataLoader runs with batch_size=None). Every rank therefore yields batches forever.
- Inside a stream, `open_shards` shards are open at a time and mixed through a shuffle buffer; the
  order is computed before reading, so each shard is read sequentially (no random access): all
  tar reading goes through data.location's one reader, `open_shard(location)`, which yields a
  shard's members in order (a remote location through data.location.iter_shard: retries, deadline;
  docs/DATA.md, "Shard locations").
- Global batch j of a rank comes from virtual stream v = j % workers (DataLoader consumes workers
  round-robin), as local batch j // workers of that stream. A worker that resumes at start_step=k
  plays stream (w + k) % workers, skips whole epochs without touching them and, inside the current
  epoch, skips the samples of batches already produced without decoding them (shards whose needed
  samples all lie before the resume point are not opened): a resumed run equals an uninterrupted
  one bitwise (tests/data/test_stream.py).
- Corrupt or truncated tars: the rest of the shard is skipped with one CorruptShardWarning per shard
  and worker and counted in the batch ("corrupt_shards"); its samples are replaced inside their
  batch. on_corrupt="fail" raises instead. A batch with no readable sample raises (never hangs).
  Changing num_workers, world_size or seed changes the order (not the epoch's content).
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import tarfile
import warnings
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blindseg_dist.config import ON_CORRUPT  # what a corrupt shard does: skip the rest of it (counted) | raise
from blindseg_dist.data import workers
from blindseg_dist.data import location as _loc
from blindseg_dist.data.location import index_shard, open_shard  # noqa: F401 - index_shard: importable here as before
from blindseg_dist.data.labels import TILE
from blindseg_dist.data.sampler import SampleTable, repeats, stream_order, stream_slice
from blindseg_dist.data.views import TwoViewTransform


class CorruptShardWarning(RuntimeWarning):
    """A shard could not be read completely; the rest of it was skipped."""


class CorruptShardError(RuntimeError):
    """A shard could not be read (on_corrupt="fail"), or no shard yields any sample."""


# -- decoding -----------------------------------------------------------------------------------
def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 HxWx3 RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("image bytes do not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes) -> np.ndarray:
    """Single-channel 8-bit PNG bytes -> uint8 HxW (never expanded to 3 channels)."""
    lab = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError("label bytes do not decode")
    if lab.ndim != 2 or lab.dtype != np.uint8:
        raise ValueError(f"label must be a single-channel 8-bit PNG, got {lab.dtype} {lab.shape}")
    return lab


# -- reading ---------------------------------------------------------------------------------
def iter_samples(location: str, remote: "_loc.RemoteOptions | None" = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Complete samples (an image, a label and meta) of a shard, ``(key, {ext: bytes})``, in order.

    A local shard is one pass of data.location's tar reader, ``open_shard`` (its errors as they
    are: tarfile.ReadError, EOFError, OSError); a remote location (http(s)://, pipe:CMD, s3://, ...)
    is streamed by data.location.iter_shard with ``remote``'s retries and deadline (docs/DATA.md,
    "Shard locations"); after its retries it raises ShardReadError, an OSError. The stream treats
    all of these as a corrupt shard."""
    if _loc.is_remote(location):
        r = remote or _loc.RemoteOptions()
        yield from _loc.iter_shard(location, retries=r.retries, timeout=r.timeout)
        return
    yield from _loc.group_samples(open_shard(location))


def load_sample_table(shards, remote: "_loc.RemoteOptions | None" = None) -> SampleTable:
    """The sampler's table from a shard location's manifest.json (or, for tar paths or a location
    without a manifest, by reading every shard's meta.json members once, with a warning). Any
    location of data.location.resolve: a folder, a brace pattern, http(s)://, pipe:CMD, s3://, ..."""
    r = remote or _loc.RemoteOptions()
    found = _loc.resolve(shards, retries=r.retries, timeout=r.timeout)
    paths, manifest = found.urls, found.manifest
    if manifest is not None and isinstance(manifest.get("samples"), list):
        index = {_loc.shard_name(p): i for i, p in enumerate(paths)}
        samples = []
        for s in manifest["samples"]:
            if s.get("shard") in index:
                samples.append({**s, "shard": index[s["shard"]]})
        # manifests of blindseg-shards/1 list centroids of partial tiles too: whole_tile_centroids
        # keeps exactly the whole-tile ones (a tile's centroid lies inside its tile)
        return SampleTable.from_samples(paths, samples, int(manifest.get("centroid_tile", TILE)))
    warnings.warn(f"no manifest.json with a sample list for {shards!r}: reading all {len(paths)} shards "
                  f"once to list their samples (write the shards with `blindseg shard` to avoid this)",
                  UserWarning, stacklevel=2)
    samples = []
    for i, p in enumerate(paths):
        try:
            for key, members in iter_samples(p, remote):
                meta = json.loads(members["meta.json"])
                samples.append({"key": key, "shard": i, "size": meta.get("size") or [0, 0],
                                "centroids": meta.get("centroids") or {}})
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            warnings.warn(f"corrupt shard {p}: {type(e).__name__}: {e}; listing its good prefix only",
                          CorruptShardWarning, stacklevel=2)
    if not samples:
        raise CorruptShardError(f"none of the {len(paths)} shards yields a readable sample (first: {paths[0]}); "
                                f"check the shard folder or rewrite the shards")
    return SampleTable.from_samples(paths, samples, TILE)


class _Unreadable(Exception):
    """A sample of the plan could not be read from its shard (corrupt, truncated or missing)."""


class _Readers:
    """Sequential readers of the shards one stream epoch needs (per worker, per epoch).

    ``need[shard][key]`` counts the emissions still to come; a reader advancing past a sample that
    is still needed keeps its bytes until it is emitted (a few, bounded by the shuffle buffer)."""

    def __init__(self, stream: "ShardStream", items: np.ndarray):
        self.stream, self.need, self.gens, self.cache = stream, {}, {}, {}
        keys = stream.table.keys
        for s in items["sample"]:
            d = self.need.setdefault(int(stream.table.shard[s]), {})
            k = keys[s]
            d[k] = d.get(k, 0) + 1

    def fetch(self, sample: int) -> dict[str, bytes]:
        t = self.stream.table
        si, key = int(t.shard[sample]), t.keys[sample]
        need = self.need[si]
        need[key] -= 1
        try:
            if (si, key) in self.cache:
                members = self.cache[(si, key)]
            else:
                members = self._advance(si, key)
            return members
        finally:
            if need[key] == 0:
                self.cache.pop((si, key), None)
            if not any(need.values()):
                self._close(si)

    def _advance(self, si: int, key: str) -> dict[str, bytes]:
        s = self.stream
        if si in s._dead:
            raise _Unreadable(f"shard {s.table.shards[si]} is corrupt")
        gen = self.gens.get(si)
        if gen is None:
            gen = self.gens[si] = iter_samples(s.table.shards[si], s.remote)
        need = self.need[si]
        try:
            for k, members in gen:
                if k == key:
                    if need.get(k, 0) > 0:
                        self.cache[(si, k)] = members
                    return members
                if need.get(k, 0) > 0:
                    self.cache[(si, k)] = members
        except (tarfile.TarError, OSError, EOFError) as e:
            s._corrupt(si, f"{type(e).__name__}: {e}")
            raise _Unreadable(f"shard {s.table.shards[si]} is corrupt") from None
        s._corrupt(si, f"ends before sample {key!r} that the manifest lists (truncated)")
        raise _Unreadable(f"sample {key!r} missing from {s.table.shards[si]}")

    def _close(self, si: int):
        gen = self.gens.pop(si, None)
        if gen is not None:
            gen.close()

    def close(self):
        for si in list(self.gens):
            self._close(si)
        self.cache.clear()


# -- the stream ---------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Yields dict batches forever; see the module docstring for the determinism contract."""

    def __init__(self, table: SampleTable, transform: TwoViewTransform, *, batch_size: int,
                 class_uniform: float = 0.5, epoch_batches: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_step: int = 0, on_corrupt: str = "warn",
                 shuffle_buffer: int = 16, open_shards: int = 4, info: bool = False,
                 remote: "_loc.RemoteOptions | None" = None, planner=None):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt (data.on_corrupt) must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if batch_size < 1 or (epoch_batches is not None and epoch_batches < 1) or start_step < 0 \
                or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, epoch_batches >= 1, start_step >= 0, 0 <= rank < world_size; "
                             f"got {batch_size}, {epoch_batches}, {start_step}, {rank}, {world_size}")
        if not 0.0 <= class_uniform <= 1.0:
            raise ValueError(f"class_uniform (data.class_uniform) must be in [0, 1], got {class_uniform}")
        self.table, self.transform = table, transform
        self.remote = remote or _loc.RemoteOptions()  # retries and deadline of remote shards
        self.batch_size, self.pct = int(batch_size), float(class_uniform)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers, self.start_step = int(num_workers), int(start_step)
        self.on_corrupt, self.info = on_corrupt, bool(info)
        # planner(batch, step) -> batch: adds what is computed from a batch and its global step in the
        # worker (the losses' sampling plans, losses/plans.py); it must be picklable
        self.planner = planner
        self.shuffle_buffer, self.open_shards = max(1, int(shuffle_buffer)), max(1, int(open_shards))
        self.streams = self.world_size * max(1, self.num_workers)
        self.repeat = repeats(table, self.pct, self.streams, self.batch_size, epoch_batches)
        full = self.repeat * table.epoch_size(self.pct) // (self.streams * self.batch_size)
        self.epoch_batches = full if epoch_batches is None else int(epoch_batches)
        self._warned: set[int] = set()
        self._dead: set[int] = set()
        self.corrupt_shards = 0  # distinct shards found corrupt by this worker
        self.bad_samples = 0  # samples that could not be read or decoded (replaced inside their batch)

    @property
    def shards(self) -> list[str]:
        return self.table.shards

    def epoch_items(self, stream_epoch: int, g: int) -> np.ndarray:
        """The items stream g emits in stream epoch E, in emission order (epoch_batches x batch_size)."""
        per = self.epoch_batches * self.batch_size
        items = stream_slice(self.table, self.pct, self.seed, stream_epoch, self.repeat, self.streams, per, g)
        return stream_order(items, self.table, self.seed, stream_epoch, g, self.open_shards, self.shuffle_buffer)

    def _corrupt(self, si: int, error: str):
        path = self.table.shards[si]
        self._dead.add(si)
        if self.on_corrupt == "fail":
            raise CorruptShardError(f"corrupt shard {path}: {error}. Rewrite it with the sharder, "
                                    f"or run with on_corrupt='warn' to skip the rest of it")
        if si not in self._warned:
            self._warned.add(si)
            self.corrupt_shards += 1
            warnings.warn(f"corrupt shard {path}: {error}; skipping the rest of it", CorruptShardWarning,
                          stacklevel=3)

    def _load(self, members: dict[str, bytes], item, key: str):
        image = decode_image(members[_loc.image_ext(members)])
        label = decode_label(members["label.png"])
        if label.shape != image.shape[:2]:
            raise ValueError(f"label size {label.shape} differs from image size {image.shape[:2]}")
        centroid = (int(item["cy"]), int(item["cx"])) if int(item["cls"]) >= 0 else None
        x, xa, y, g = self.transform(image, label, np.random.default_rng(int(item["seed"])), centroid=centroid,
                                     return_geometry=True)
        info = None
        if self.info:
            sx, sy = g["scaled_hw"][1] / label.shape[1], g["scaled_hw"][0] / label.shape[0]
            info = {"key": key, "class": int(item["cls"]) if centroid else None,
                    "centroid": [centroid[1], centroid[0]] if centroid else None,
                    "crop": [round(g["x0"] / sx, 2), round(g["y0"] / sy, 2), round((g["x0"] + g["cw"]) / sx, 2),
                             round((g["y0"] + g["ch"]) / sy, 2)],
                    "scale": g["scale"], "flip": g["flip"], "geometry": {**g, "source_hw": label.shape}}
        return x, xa, y, info

    def _fallback(self, start: int) -> tuple[str, dict[str, bytes]]:
        """A batch none of whose samples reads: the first sample of the first readable shard from
        ``start`` on (deterministic for given shard files), else an error (never a hang)."""
        n = len(self.table.shards)
        for j in range(n):
            si = (start + j) % n
            if si in self._dead:
                continue
            try:
                found = next(iter_samples(self.table.shards[si], self.remote), None)
            except (tarfile.TarError, OSError, EOFError) as e:
                self._corrupt(si, f"{type(e).__name__}: {e}")
                continue
            if found is not None:
                return found
        raise CorruptShardError(f"none of the {n} shards yields a readable sample (first: "
                                f"{self.table.shards[0]}); check the shard folder or rewrite the shards")

    def _batch(self, items: np.ndarray, readers: _Readers) -> dict:
        t = self.table
        raws: list = [None] * len(items)
        outs: list = [None] * len(items)
        for k, it in enumerate(items):
            s = int(it["sample"])
            where = f"sample {t.keys[s]!r} of shard {t.shards[t.shard[s]]}"
            try:
                raws[k] = readers.fetch(s)
                outs[k] = self._load(raws[k], it, t.keys[s])
            except CorruptShardError:
                raise
            except Exception as err:  # noqa: BLE001 - unreadable or undecodable: a bad sample
                raws[k] = None
                if self.on_corrupt == "fail":
                    raise CorruptShardError(f"cannot read {where}: {err}") from err
                self.bad_samples += 1
                if not isinstance(err, _Unreadable):
                    warnings.warn(f"cannot decode {where}: {err}; replaced by another sample of the batch",
                                  CorruptShardWarning, stacklevel=2)
        keys = [t.keys[int(it["sample"])] for it in items]
        good = [k for k, o in enumerate(outs) if o is not None]
        if not good:  # replace the first item by a readable sample, the others by it below
            key, raws[0] = self._fallback(int(t.shard[int(items[0]["sample"])]) + 1)
            plain = items[0].copy()
            plain["cls"] = -1
            outs[0], keys[0] = self._load(raws[0], plain, key), key
            good = [0]
        for k, o in enumerate(outs):  # deterministic replacement: the next good sample, own seed
            if o is None:
                d = min(good, key=lambda g: (g - k) % len(items))
                donor = items[d].copy()
                donor["seed"] = items[k]["seed"]
                outs[k] = self._load(raws[d], donor, keys[d])
                keys[k] = keys[d]
        batch = {
            "image": torch.stack([o[0] for o in outs]),  # (B, 3, h, w)
            "image_aug": torch.stack([o[1] for o in outs]),  # (B, 3, h, w)
            "label": torch.stack([o[2] for o in outs]),  # (B, h, w) int64
            "keys": keys,
            "corrupt_shards": torch.tensor(self.corrupt_shards, dtype=torch.int64),
            "bad_samples": torch.tensor(self.bad_samples, dtype=torch.int64),
        }
        if self.info:
            batch["info"] = [o[3] for o in outs]
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        nw = max(1, self.num_workers if info is None else info.num_workers)
        if info is not None:
            cv2.setNumThreads(1)
        first = self.start_step + w  # the first global step this worker produces
        v, local = first % nw, first // nw
        e, pos = divmod(local, self.epoch_batches)
        g = self.rank * nw + v
        B = self.batch_size
        step = first  # the global step (micro-batch index) of the next batch this worker yields
        while True:
            items = self.epoch_items(e, g)
            readers = _Readers(self, items[pos * B:])  # resume: earlier items are never read
            try:
                for b in range(pos, self.epoch_batches):
                    batch = self._batch(items[b * B:(b + 1) * B], readers)
                    yield batch if self.planner is None else self.planner(batch, step)
                    step += nw
            finally:
                readers.close()
            e, pos = e + 1, 0


def smallest_frame(shards) -> tuple[int, int] | None:
    """(h, w) of the frame with the smallest side in a shard folder's manifest (None: unknown)."""
    if not isinstance(shards, (str, os.PathLike)) or _loc.is_remote(str(shards)):
        return None
    try:
        sizes = [tuple(s["size"]) for s in (_loc.local_manifest(shards) or {})["samples"]]
    except (KeyError, TypeError, ValueError):
        return None
    return min(sizes, key=min) if sizes else None


def train_loader_from_config(cfg, *, rank: int = 0, world_size: int = 1, start_step: int = 0,
                             info: bool = False, pin_memory: bool = False, planner=None) -> DataLoader:
    """The training loader of a Config (the trainer's, and `blindseg browse`'s with info=True;
    pin_memory and planner: the trainer's, on CUDA / with the losses' sampling plans)."""
    return make_train_loader(
        cfg.data.train, batch_size=cfg.data.batch_size, crop_size=cfg.data.crop_size,
        scale_range=tuple(cfg.data.scale_range), class_uniform=cfg.data.class_uniform,
        num_workers=cfg.data.num_workers, seed=cfg.run.seed, rank=rank, world_size=world_size,
        start_step=start_step, on_corrupt=cfg.data.on_corrupt, info=info,
        remote=_loc.RemoteOptions.from_config(cfg.data), pin_memory=pin_memory, planner=planner)


def make_train_loader(shards, *, batch_size: int, crop_size: int, scale_range=(0.5, 2.0),
                      class_uniform: float = 0.5, num_workers: int = 2, seed: int = 0, rank: int = 0,
                      world_size: int = 1, start_step: int = 0, on_corrupt: str = "warn",
                      epoch_batches: int | None = None, shuffle_buffer: int = 16, open_shards: int = 4,
                      prefetch_factor: int = 2, info: bool = False,
                      remote: "_loc.RemoteOptions | None" = None, pin_memory: bool = False,
                      planner=None) -> DataLoader:
    """The training loader of one rank: an infinite DataLoader of dict batches
    {"image", "image_aug": float32 (B,3,crop,crop), "label": int64 (B,crop,crop), "keys": [str],
    "corrupt_shards", "bad_samples": int64 counters of the producing worker} (plus "info": one dict
    per sample with key, class, centroid, crop and scale, when ``info``; used by `blindseg browse`).

    shards: a shard location (docs/DATA.md, "Shard locations": a folder with manifest.json, a brace
    pattern, http(s)://, pipe:CMD, s3://, gs://) or a list of tar paths or URLs; ``remote``: the
    retries and deadline of remote shards (data.location.RemoteOptions). class_uniform: the fraction
    of an epoch drawn class-uniformly (data/sampler.py). epoch_batches: batches per (rank, worker)
    and stream epoch; default: the whole class-uniform epoch split over world_size x workers.
    The batches from step k on with start_step=k equal those of an uninterrupted run.
    pin_memory: page-locked batches (CUDA training: the trainer's host-to-device copies are then
    non_blocking). planner: ``planner(batch, step) -> batch`` runs in the worker on every batch with
    its global step (the micro-batch index from 0; losses/plans.LoaderPlanner adds CWCL's plans)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    table = load_sample_table(shards, remote)
    transform = TwoViewTransform(crop_size=crop_size, scale_range=scale_range)
    ds = ShardStream(table, transform, batch_size=batch_size, class_uniform=class_uniform,
                     epoch_batches=epoch_batches, seed=seed, rank=rank, world_size=world_size,
                     num_workers=num_workers, start_step=start_step, on_corrupt=on_corrupt,
                     shuffle_buffer=shuffle_buffer, open_shards=open_shards, info=info, remote=remote,
                     planner=planner)
    kw = {}
    if num_workers > 0:
        # forkserver, not fork: OpenCV's thread pool does not survive fork (cv2.setNumThreads in a
        # forked worker deadlocks once the parent has used cv2); the preloaded server keeps worker
        # start-up cheap. Workers and the forkserver ignore SIGINT/SIGTERM (the training process
        # checkpoints on them) and end with the training process (data/workers.py).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["blindseg_dist.data._forkserver"])
        kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor, multiprocessing_context=ctx,
                  worker_init_fn=functools.partial(workers.worker_init, os.getpid()))
    return _TrainLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw)


class _TrainLoader(DataLoader):
    """A DataLoader whose worker iterator is shut down at interpreter exit: its workers ignore
    SIGTERM, so multiprocessing's exit handler could not end them (data/workers.py)."""

    def _get_iterator(self):
        it = super()._get_iterator()
        if self.num_workers > 0:
            workers.track(it)
        return it
