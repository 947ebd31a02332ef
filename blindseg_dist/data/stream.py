"""Infinite, deterministic, resumable training stream over WebDataset shards (docs/DISTRIBUTED.md, "Streaming").

Design (no webdataset shuffle buffers, so every batch is a pure function of its global step):
- Each rank owns independent streams, one per DataLoader worker. Global batch j of a rank comes
  from "virtual stream" v = j % num_workers (DataLoader consumes workers round-robin), as local
  batch j // num_workers of that stream.
- A stream is a sequence of epochs. Epoch e of stream v is seeded by (seed, rank, v, e): it
  resamples shards with replacement, interleaves a few open shards, shuffles samples in a small
  buffer and yields exactly `epoch_batches` full batches (batching happens in the worker, so the
  DataLoader runs with batch_size=None). Every rank therefore yields batches forever.
- Shards are indexed (tar headers only; member data is read on demand), so resuming at step k
  skips whole epochs without touching them and, inside the current epoch, skips the raw samples of
  the batches already produced without reading or decoding them (tests/data/test_stream.py proves
  bitwise equality with an uninterrupted run).
- A worker that resumes at start_step=k plays the virtual stream (w + k) % num_workers, so the
  DataLoader's round-robin order continues exactly where the interrupted run stopped.
- Corrupt or truncated tars: the rest of the shard is skipped with one CorruptShardWarning per shard
  and worker and counted in the batch ("corrupt_shards"); on_corrupt="fail" raises instead. If no
  shard yields a sample, the stream raises after a bounded number of draws (never hangs).
  Changing num_workers, world_size (through the default epoch_batches) or seed changes the stream.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blindseg_dist.data import workers
from blindseg_dist.data.views import TwoViewTransform

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "<dir/><key>.<ext>", ext may hold dots
_IMAGE_EXTS = ("image.png", "image.jpg", "image.jpeg")


ON_CORRUPT = ("warn", "fail")  # what a corrupt shard does: skip the rest of it (counted) | raise


class CorruptShardWarning(RuntimeWarning):
    """A shard could not be read completely; the rest of it was skipped."""


class CorruptShardError(RuntimeError):
    """A shard could not be read (on_corrupt="fail"), or no shard yields any sample."""


# -- shard discovery and indexing ---------------------------------------------------------------
def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], dict[str, int]]:
    """A shard directory (manifest.json, or *.tar) or a list of tar paths -> (paths, expected counts).

    Expected counts come from the directory's manifest.json when present (used to detect tars
    truncated exactly at a member boundary)."""
    counts: dict[str, int] = {}
    if isinstance(shards, (str, os.PathLike)):
        root = Path(shards)
        if root.is_file() and root.suffix == ".tar":
            paths = [str(root)]
        elif root.is_dir():
            manifest = root / "manifest.json"
            if manifest.is_file():
                try:
                    m = json.loads(manifest.read_text())
                    entries = m["shards"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{manifest}: not a valid shard manifest ({e}); rewrite the shards "
                                     f"with `blindseg shard` or pass the tar paths explicitly") from None
                paths = [str(root / s["name"]) for s in entries]
                counts = {str(root / s["name"]): int(s["count"]) for s in entries if "count" in s}
            else:
                paths = sorted(str(p) for p in root.glob("*.tar"))
        elif root.is_file():
            hint = f" (its folder {root.parent} holds the shards)" if root.name == "manifest.json" else ""
            raise FileNotFoundError(f"shard path {root} is a file, not a .tar shard or a shard folder{hint}; "
                                    f"point data paths at a folder written by the sharder (with manifest.json) "
                                    f"or at .tar files")
        else:
            raise FileNotFoundError(f"shard path {root} does not exist; point data paths at a folder "
                                    f"written by the sharder (with manifest.json) or at .tar files")
    else:
        paths = [str(p) for p in shards]
    if not paths:
        raise FileNotFoundError(f"no .tar shards found in {shards!r}; run the sharder first")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed but missing, e.g. {missing[0]}; "
                                f"copy the complete shard folder or rewrite the shards")
    return paths, counts


def index_shard(path: str, expected: int | None = None):
    """Scan a tar's headers (no member data is read) -> (samples, error).

    samples: [(key, {ext: (offset, size)})] for complete samples (an image, a label and meta).
    error: None, or a message when the tar is truncated/corrupt (samples then hold its good prefix).
    """
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    error = None
    try:
        fsize = os.path.getsize(path)
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            cur_key, cur = None, {}
            while True:
                ti = tf.next()
                if ti is None:
                    # a clean end is a zero block; anything else is garbage or a cut-off file
                    f.seek(tf.offset)
                    block = f.read(512)
                    if len(block) < 512 or block.count(0) != 512:
                        error = f"truncated or corrupt after byte {tf.offset}"
                    break
                if not ti.isfile():
                    continue
                if ti.offset_data + ti.size > fsize:
                    error = f"member {ti.name} extends past the end of the file (truncated)"
                    break
                mm = _MEMBER.match(ti.name)
                if mm is None:
                    continue
                key, ext = mm.group(1), mm.group(2).lower()
                if key != cur_key:
                    if cur_key is not None and _complete(cur):
                        samples.append((cur_key, cur))
                    cur_key, cur = key, {}
                cur[ext] = (ti.offset_data, ti.size)
            if cur_key is not None and _complete(cur):  # its members all lie inside the file
                samples.append((cur_key, cur))
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and expected is not None and len(samples) < expected:
        error = f"holds {len(samples)} complete samples, the manifest says {expected} (truncated)"
    return samples, error


def _complete(members: dict) -> bool:
    return "label.png" in members and "meta.json" in members and any(e in members for e in _IMAGE_EXTS)


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


class _Files:
    """A small LRU of open shard files (per worker process)."""

    def __init__(self, size: int = 8):
        self.size, self.files, self.pid = size, OrderedDict(), os.getpid()

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():  # forked: never share file offsets with the parent
            self.files, self.pid = OrderedDict(), os.getpid()
        f = self.files.pop(path, None) or open(path, "rb")
        self.files[path] = f
        while len(self.files) > self.size:
            self.files.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read in {path} at byte {offset}")
        return data

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __getstate__(self):
        return {"size": self.size}

    def __setstate__(self, state):
        self.__init__(state["size"])


# -- the stream ---------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Yields dict batches forever; see the module docstring for the determinism contract."""

    def __init__(self, shards: Sequence[str], transform: TwoViewTransform, *, batch_size: int,
                 epoch_batches: int, seed: int = 0, rank: int = 0, num_workers: int = 0,
                 start_step: int = 0, on_corrupt: str = "warn", expected_counts: dict | None = None,
                 shuffle_buffer: int = 16, open_shards: int = 4):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt (data.on_corrupt) must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if batch_size < 1 or epoch_batches < 1 or start_step < 0 or rank < 0:
            raise ValueError(f"need batch_size >= 1, epoch_batches >= 1, start_step >= 0, rank >= 0; got "
                             f"{batch_size}, {epoch_batches}, {start_step}, {rank}")
        self.shards = list(shards)
        self.transform = transform
        self.batch_size, self.epoch_batches = int(batch_size), int(epoch_batches)
        self.seed, self.rank = int(seed), int(rank)
        self.num_workers, self.start_step = int(num_workers), int(start_step)
        self.on_corrupt = on_corrupt
        self.expected = dict(expected_counts or {})
        self.shuffle_buffer, self.open_shards = max(1, int(shuffle_buffer)), max(1, int(open_shards))
        self._index: dict[int, list] = {}
        self._warned: set[int] = set()
        self._dead: set[int] = set()
        self._files = _Files()
        self.corrupt_shards = 0  # distinct shards found corrupt by this worker
        self.bad_samples = 0  # samples that failed to decode (replaced inside their batch)

    # the sample index of shard i, built once per worker
    def _shard(self, i: int) -> list:
        if i not in self._index:
            path = self.shards[i]
            samples, error = index_shard(path, self.expected.get(path))
            if error is not None:
                if self.on_corrupt == "fail":
                    raise CorruptShardError(f"corrupt shard {path}: {error}. Rewrite it with the sharder, "
                                            f"or run with on_corrupt='warn' to skip the rest of it")
                if i not in self._warned:
                    self._warned.add(i)
                    self.corrupt_shards += 1
                    warnings.warn(f"corrupt shard {path}: {error}; skipping the rest of it "
                                  f"({len(samples)} good samples kept)", CorruptShardWarning, stacklevel=2)
            if not samples:
                self._dead.add(i)
            self._index[i] = [(i, key, members) for key, members in samples]
        return self._index[i]

    def _epoch_rng(self, v: int, e: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, self.rank, v, e, 0x5EED]))

    def _new_reader(self, rng: np.random.Generator) -> Iterator:
        n = len(self.shards)
        for _ in range(100 + 50 * n):  # bounded: never hang on unreadable shards
            if len(self._dead) == n:
                break
            samples = self._shard(int(rng.integers(n)))
            if samples:
                return iter(samples)
        raise CorruptShardError(f"none of the {n} shards yields a readable sample (first: {self.shards[0]}); "
                                f"check the shard folder or rewrite the shards")

    def _epoch(self, v: int, e: int) -> Iterator[tuple[tuple, int]]:
        """Exactly epoch_batches * batch_size (sample ref, sample seed) pairs of epoch e, stream v."""
        rng = self._epoch_rng(v, e)
        readers = [self._new_reader(rng) for _ in range(min(self.open_shards, len(self.shards)))]
        buf: list = []
        for _ in range(self.epoch_batches * self.batch_size):
            while len(buf) < self.shuffle_buffer:
                r = int(rng.integers(len(readers)))
                ref = next(readers[r], None)
                if ref is None:
                    readers[r] = self._new_reader(rng)
                else:
                    buf.append(ref)
            j = int(rng.integers(len(buf)))
            ref = buf[j]
            buf[j] = buf[-1]
            buf.pop()
            yield ref, int(rng.integers(2**63))

    def _load(self, ref: tuple, sample_seed: int):
        i, key, members = ref
        path = self.shards[i]
        ext = next(e for e in _IMAGE_EXTS if e in members)
        image = decode_image(self._files.read(path, *members[ext]))
        label = decode_label(self._files.read(path, *members["label.png"]))
        meta = json.loads(self._files.read(path, *members["meta.json"]))
        if label.shape != image.shape[:2]:
            raise ValueError(f"label size {label.shape} differs from image size {image.shape[:2]}")
        return self.transform(image, label, meta, np.random.default_rng(sample_seed))

    def _batch(self, items: list[tuple[tuple, int]]) -> dict:
        outs: list = [None] * len(items)
        for k, (ref, s) in enumerate(items):
            try:
                outs[k] = self._load(ref, s)
            except Exception as err:  # noqa: BLE001 - any decode failure is a bad sample
                where = f"sample {ref[1]!r} of shard {self.shards[ref[0]]}"
                if self.on_corrupt == "fail":
                    raise CorruptShardError(f"cannot decode {where}: {err}") from err
                self.bad_samples += 1
                warnings.warn(f"cannot decode {where}: {err}; replaced by another sample of the batch",
                              CorruptShardWarning, stacklevel=2)
        good = [k for k, o in enumerate(outs) if o is not None]
        if not good:
            raise CorruptShardError(f"no sample of a batch decodes (first: {items[0][0][1]!r} in "
                                    f"{self.shards[items[0][0][0]]}); check the shards")
        for k, o in enumerate(outs):  # deterministic replacement: the next good sample, own seed
            if o is None:
                donor = items[min(good, key=lambda g: (g - k) % len(items))][0]
                outs[k] = self._load(donor, items[k][1])
        return {
            "image": torch.stack([o[0] for o in outs]),  # (B, 3, h, w)
            "image_aug": torch.stack([o[1] for o in outs]),  # (B, 3, h, w)
            "label": torch.stack([o[2] for o in outs]),  # (B, h, w) int64
            "keys": [ref[1] for ref, _ in items],
            "corrupt_shards": torch.tensor(self.corrupt_shards, dtype=torch.int64),
            "bad_samples": torch.tensor(self.bad_samples, dtype=torch.int64),
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        nw = max(1, self.num_workers if info is None else info.num_workers)
        if info is not None:
            cv2.setNumThreads(1)
        first = self.start_step + w  # the first global step this worker produces
        v, local = first % nw, first // nw
        e, pos = divmod(local, self.epoch_batches)
        B = self.batch_size
        while True:
            refs = self._epoch(v, e)
            for _ in range(pos * B):  # resume: skip produced samples without reading them
                next(refs)
            for _ in range(self.epoch_batches - pos):
                yield self._batch([next(refs) for _ in range(B)])
            e, pos = e + 1, 0


def smallest_frame(shards) -> tuple[int, int] | None:
    """(h, w) of the frame with the smallest side in a shard folder's manifest (None: unknown)."""
    if not isinstance(shards, (str, os.PathLike)) or not (Path(shards) / "manifest.json").is_file():
        return None
    try:
        sizes = [tuple(s["size"]) for s in json.loads((Path(shards) / "manifest.json").read_text())["samples"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return min(sizes, key=min) if sizes else None


def make_train_loader(shards, *, batch_size: int, crop_size: int, scale_range=(0.5, 2.0),
                      class_uniform: float = 0.5, num_workers: int = 2, seed: int = 0, rank: int = 0,
                      world_size: int = 1, start_step: int = 0, on_corrupt: str = "warn",
                      epoch_batches: int | None = None, shuffle_buffer: int = 16,
                      prefetch_factor: int = 2) -> DataLoader:
    """The training loader of one rank: an infinite DataLoader of dict batches
    {"image", "image_aug": float32 (B,3,crop,crop), "label": int64 (B,crop,crop), "keys": [str],
    "corrupt_shards", "bad_samples": int64 counters of the producing worker}.

    shards: a shard directory (manifest.json) or a list of tar paths. epoch_batches: batches per
    (rank, worker) epoch; default: one pass over the data split over world_size x workers.
    The batches from step k on with start_step=k equal those of an uninterrupted run."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    paths, counts = resolve_shards(shards)
    if epoch_batches is None:
        total = sum(counts.values()) if len(counts) == len(paths) else \
            sum(len(index_shard(p)[0]) for p in paths)
        epoch_batches = max(1, total // (batch_size * world_size * max(1, num_workers)))
    transform = TwoViewTransform(crop_size=crop_size, scale_range=scale_range, class_uniform=class_uniform)
    ds = ShardStream(paths, transform, batch_size=batch_size, epoch_batches=epoch_batches, seed=seed,
                     rank=rank, num_workers=num_workers, start_step=start_step, on_corrupt=on_corrupt,
                     expected_counts=counts, shuffle_buffer=shuffle_buffer)
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
    return _TrainLoader(ds, batch_size=None, num_workers=num_workers, **kw)


class _TrainLoader(DataLoader):
    """A DataLoader whose worker iterator is shut down at interpreter exit: its workers ignore
    SIGTERM, so multiprocessing's exit handler could not end them (data/workers.py)."""

    def _get_iterator(self):
        it = super()._get_iterator()
        if self.num_workers > 0:
            workers.track(it)
        return it
