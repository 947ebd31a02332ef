"""`blindseg corrupt`: an evaluation set under the common image corruptions of Hendrycks and Dietterich
(the ``imagecorruptions`` package, the one Cityscapes-C and the other "-C" benchmarks are made with),
one shard set per (corruption, severity) (docs/DATA.md, "Corrupted evaluation sets").

Every image goes through ``imagecorruptions.corrupt`` unchanged: no corruption is re-implemented or
patched here. Labels and sample keys are the original's; images are stored as PNG, so a shard holds
exactly the package's output. Each image gets its own seed, a hash of (key, corruption, severity):
the package draws from numpy's global RNG (and, for ``impulse_noise`` and ``glass_blur``, from the
``seed`` argument it takes), so the same seed gives the same pixels and a rerun writes the same bytes,
whatever the order, the worker or the other sets of the run.

Output: ``OUT/<corruption>-<severity>/`` per set, each with a manifest (the sharder's, data/shards.py)
that also names ``corruption``, ``severity``, ``corruption_package`` and the ``corrupted_from`` set.
A set whose manifest is complete (same corruption, severity, input, frames and package) is skipped on a
rerun; a partial one is finished (its completed, verified shards are kept, the rest written again: the
same bytes), unless it was started from another input, when it is written anew (``corruption.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .. import atomic
from ..corruptions import (EXTRA, SECONDS_PER_IMAGE, SECONDS_PER_IMAGE_1024X2048, SEVERITIES,  # noqa: F401
                           STANDARD, speed_table)

_SEEDED = ("impulse_noise", "glass_blur")  # take a `seed` argument instead of numpy's global RNG
PACKAGE = "imagecorruptions-imaug"  # the distribution that provides the `imagecorruptions` module

class CorruptionError(ValueError):
    """A corruption or severity that the package does not have (`blindseg corrupt` exits 2)."""


def parse_corruptions(spec: str | list[str]) -> list[str]:
    """``all`` (the 15 standard ones), or comma-separated names of the 19; unknown names raise
    CorruptionError with the list."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    names: list[str] = []
    for p in parts:
        for n in (STANDARD if p == "all" else (p,)):
            if n not in names:
                names.append(n)
    unknown = [n for n in names if n not in STANDARD + EXTRA]
    if unknown or not names:
        raise CorruptionError(f"unknown corruption {', '.join(unknown) or repr(spec)}; choose `all` (the 15 standard "
                              f"ones: {', '.join(STANDARD)}) or names among these and {', '.join(EXTRA)}")
    return names


def parse_severities(spec: str | list[int]) -> list[int]:
    """Comma-separated severities 1..5 (``all``: 1,2,3,4,5)."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(SEVERITIES)
        try:
            vals = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise CorruptionError(f"severities {spec!r}: give integers 1..5, e.g. 3 or 1,3,5") from None
    else:
        vals = [int(v) for v in spec]
    bad = [v for v in vals if v not in SEVERITIES]
    if bad or not vals:
        raise CorruptionError(f"severity {bad or spec!r}: the package has severities 1..5")
    return sorted(set(vals))


def sample_seed(key: str, corruption: str, severity: int) -> int:
    """The seed of one image: the first 32 bits of sha256("key|corruption|severity")."""
    digest = hashlib.sha256(f"{key}|{corruption}|{severity}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``imagecorruptions.corrupt(image, corruption_name=corruption, severity=severity)`` with numpy's global
    RNG seeded by ``seed`` (restored afterwards), and ``seed`` passed to the corruptions that take one."""
    from imagecorruptions import corrupt

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        kw = {"seed": seed} if corruption in _SEEDED else {}
        return corrupt(image, corruption_name=corruption, severity=severity, **kw)
    finally:
        np.random.set_state(state)


def set_name(corruption: str, severity: int) -> str:
    """The folder of one set: ``<corruption>-<severity>``."""
    return f"{corruption}-{severity}"


def _open_eval_set(data: str):
    """The evaluation set at ``data`` exactly as `blindseg eval` reads it: shards (any location) or a
    raw dataset folder (DATASET:PATH or a detected layout), at full resolution."""
    from ..engine.evaluate import build_eval_dataset

    return build_eval_dataset(data, "full")


def _describe(data: str, ds) -> dict:
    """dataset, split, label_map and samples_per_shard of the set at ``data`` (for the new manifests)."""
    from ..data.location import has_braces, is_remote, load_location_manifest

    if ds.source is not None:  # a raw folder: its reader
        src = ds.source.source
        return {"dataset": src.name, "split": src.split, "label_map": src.label_map_name}
    if is_remote(data) or has_braces(data):
        m = load_location_manifest(data) or {}
    else:
        p = Path(data) / "manifest.json"
        m = json.loads(p.read_text()) if p.is_file() else {}
    return {"dataset": m.get("dataset", "shards"), "split": m.get("split", "eval"),
            "label_map": m.get("label_map", "trainids"), "samples_per_shard": m.get("samples_per_shard")}


class CorruptedSource:
    """The sharder's view (data/shards.py: items, decode, name, split, label_map_name) of an evaluation
    set under one corruption: decode reads the original frame and corrupts its image. Picklable: each
    worker process opens the evaluation set itself on first use."""

    def __init__(self, data: str, corruption: str, severity: int, keys: list[str], info: dict):
        from ..data.sources.base import Item

        self.data, self.corruption, self.severity = data, corruption, severity
        self.name, self.split, self.label_map_name = info["dataset"], info["split"], info["label_map"]
        self.root = data
        self.items = [Item(k, str(i), "") for i, k in enumerate(keys)]  # image_path: the index in the set
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self._ds = None

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def decode(self, item):
        from ..data.sources.base import Decoded, SampleError

        if self._ds is None:
            self._ds = _open_eval_set(self.data)
        image, label, key = self._ds.load_raw(int(item.image_path))
        if key != item.key:
            raise RuntimeError(f"{self.data}: sample {int(item.image_path)} is {key!r}, expected {item.key!r}; "
                               "the evaluation set changed while it was being corrupted")
        try:
            out = corrupt_image(image, self.corruption, self.severity, sample_seed(key, self.corruption, self.severity))
        except AttributeError as e:  # the package's way of refusing an input (e.g. a side under 32 px)
            raise SampleError(f"imagecorruptions refused {key}: {e}") from None
        if out.shape != image.shape:
            raise SampleError(f"imagecorruptions returned {out.shape} for {key} of shape {image.shape}")
        return Decoded(out, label, [])


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{PACKAGE}=={version(PACKAGE)}"
    except PackageNotFoundError:
        return "imagecorruptions"


def _complete(folder: Path, record: dict) -> bool:
    """A set finished by an earlier run of the same request."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return all(m.get(k) == v for k, v in record.items())


def _update_index(index_path: Path, origin: str, package: str, sets: list[dict]) -> None:
    """``out_dir/corruptions.json``: the sets of ``origin`` listed before, with ``sets`` added or replaced."""
    try:
        old = json.loads(index_path.read_text()).get("sets", [])
    except (OSError, ValueError):
        old = []
    merged = {(r["corruption"], r["severity"]): r for r in old if r.get("corrupted_from") == origin}
    for r in sets:
        merged[(r["corruption"], r["severity"])] = {k: v for k, v in r.items() if k != "written"} | \
            {"corrupted_from": origin, "path": set_name(r["corruption"], r["severity"])}
    atomic.write_json(index_path, {"corrupted_from": origin, "corruption_package": package,
                                   "sets": sorted(merged.values(), key=lambda r: (r["corruption"], r["severity"]))},
                      indent=1)


MARKER = "corruption.json"  # what a set folder is being written from (so a rerun never finishes another request's set)


def _start_set(folder: Path, record: dict) -> None:
    """Before writing a set: when its folder was started for another request (another input, frames, package),
    remove what that wrote (the sharder would keep shards whose keys match); then record this request."""
    try:
        same = json.loads((folder / MARKER).read_text()) == record
    except (OSError, ValueError):
        same = False
    if not same and folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and (p.suffix in (".tar", ".json") or ".tmp-" in p.name):
                p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / MARKER, record, indent=1, sort_keys=True)


def corrupt_dataset(data: str, out_dir: str | os.PathLike, corruptions, severities, *, workers: int = 1,
                    samples_per_shard: int | None = None, progress: bool = True) -> dict:
    """Write ``data`` under every (corruption, severity) into ``out_dir/<corruption>-<severity>/``; returns
    {"sets": [{corruption, severity, path, num_samples, skipped, written}], "seconds"}. Also writes
    ``out_dir/corruptions.json`` (the list of sets and where they came from)."""
    try:
        import imagecorruptions  # noqa: F401
    except ImportError as e:
        raise ImportError(f"`blindseg corrupt` needs the imagecorruptions module ({e}); install it with "
                          f"`pip install --no-deps {PACKAGE}` (see requirements/nodeps.txt)") from None
    from ..data.shards import write_shards

    names = parse_corruptions(corruptions)
    levels = parse_severities(severities)
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = _open_eval_set(data)
    keys = [ds.key(i) for i in range(len(ds))]
    if not keys:
        raise ValueError(f"{data}: the evaluation set holds no frames")
    info = _describe(data, ds)
    spp = int(samples_per_shard or info.get("samples_per_shard") or 64)
    from ..engine.evaluate import origin_id

    origin = origin_id(data)  # how `blindseg eval` finds the clean set of the family among its targets
    package = _package_version()
    keys_digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    sets = []
    todo = [(c, s) for c in names for s in levels]
    for n, (c, s) in enumerate(todo, 1):
        folder = out / set_name(c, s)
        record = {"corruption": c, "severity": s, "corrupted_from": origin, "corrupted_keys": keys_digest,
                  "corruption_package": package, "corruption_seed": "sha256(key|corruption|severity)[:4] little-endian"}
        written = not _complete(folder, record)
        if written:
            if progress:
                print(f"[corrupt] {n}/{len(todo)}: {c} severity {s}", flush=True)
            _start_set(folder, record)
            source = CorruptedSource(data, c, s, keys, info)
            manifest = write_shards(source, folder, samples_per_shard=spp, image_format="png", workers=workers,
                                    progress=progress, min_shards=1)
            manifest.update(record)
            atomic.write_json(folder / "manifest.json", manifest, indent=1, sort_keys=True)
        else:
            manifest = json.loads((folder / "manifest.json").read_text())
            if progress:
                print(f"[corrupt] {n}/{len(todo)}: {c} severity {s} already complete in {folder}", flush=True)
        sets.append({"corruption": c, "severity": s, "path": str(folder), "num_samples": manifest["num_samples"],
                     "skipped": len(manifest.get("skipped", [])), "written": written})
    _update_index(out / "corruptions.json", origin, package, sets)
    summary = {"sets": sets, "seconds": time.time() - start, "num_frames": len(keys)}
    if progress:
        print(f"[corrupt] {len(sets)} sets of {len(keys)} frames ({sum(r['written'] for r in sets)} written, "
              f"{sum(not r['written'] for r in sets)} already complete) in {summary['seconds']:.1f}s -> {out}")
    return summary
