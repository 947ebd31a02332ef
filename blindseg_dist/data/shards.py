"""Write a dataset split as WebDataset tar shards plus ``manifest.json`` (schema:
docs/DATA.md, "Shards", and data_shards/README.md).

Samples are assigned to shards deterministically (items sorted by key, then permuted with a
recorded seed, ``samples_per_shard`` per chunk), every shard is written to a temporary name and
renamed when complete, and a small sidecar ``<shard>.json`` (written atomically after the tar) records what the shard holds. A
rerun therefore finds the completed shards (sidecar + size + sha256 verified), keeps them and
writes only what is missing; ``manifest.json`` is written last, atomically. Tars are byte-
deterministic (fixed mtimes/owners, sorted JSON), so a rewritten shard has the same sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np

from .. import __version__, atomic
from .labels import TILE, class_stats
from .location import index_shard
from .sources.base import Item, SampleError, Source

FORMAT = "blindseg-shards/2"  # /2: whole-tile centroids, centroid_tile, shuffled sample order
SHUFFLE_SEED = 0  # default seed of the sample order written into the shards
DEFAULT_MIN_SHARDS = 16  # ranks x workers of a typical launch (8 GPUs x 2 workers)
JPEG_QUALITY = 95
PNG_COMPRESSION = 3


def shard_prefix(source: Source) -> str:
    """Shard file prefix from dataset and split, e.g. ``cityscapes-val``."""
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_]+", "_", s)

    return f"{clean(source.name)}-{clean(source.split)}"


def _encode(source: Source, item: Item, image_format: str, tile: int = TILE) -> tuple[dict[str, bytes], dict]:
    """Decode one pair and encode the tar members; raises SampleError to skip it."""
    image, label, unknown = source.decode(item)
    if unknown:
        raise SampleError(f"label ids outside the {source.label_map_name} table: "
                          f"{unknown[:10]} in {item.label_path}")
    if image_format == "jpg" and item.image_path.lower().endswith((".jpg", ".jpeg")):
        img_bytes = Path(item.image_path).read_bytes()  # already JPEG: keep the original bytes
    else:
        if image_format == "png":
            ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
        else:
            ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        ok, buf = cv2.imencode(ext, image[..., ::-1], params)
        if not ok:
            raise SampleError(f"could not encode image of {item.key}")
        img_bytes = buf.tobytes()
    ok, lab = cv2.imencode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise SampleError(f"could not encode label of {item.key}")
    pixels, cents = class_stats(label, tile)
    meta = {"key": item.key, "size": [int(label.shape[0]), int(label.shape[1])],
            "class_pixels": pixels, "centroids": cents}
    files = {f"{item.key}.image.{image_format}": img_bytes, f"{item.key}.label.png": lab.tobytes(),
             f"{item.key}.meta.json": json.dumps(meta, sort_keys=True).encode()}
    return files, meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(task: tuple) -> dict:
    """Write one whole shard (tar, then sidecar); return the sidecar record."""
    source, out_dir, name, items, image_format, tile = task
    cv2.setNumThreads(1)
    out_dir = Path(out_dir)
    samples, skipped = [], []
    tar_path = out_dir / f"{name}.tar"
    with atomic.replacing(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for item in items:
                try:
                    files, meta = _encode(source, item, image_format, tile)
                except SampleError as e:
                    skipped.append({"key": item.key, "reason": str(e)})
                    continue
                except OSError as e:
                    skipped.append({"key": item.key, "reason": f"unreadable: {e}"})
                    continue
                for member, data in files.items():
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
                samples.append({**meta, "shard": f"{name}.tar"})
        if not samples:  # every pair skipped: no empty tar
            tmp.unlink()
    record = {"name": f"{name}.tar", "keys": [it.key for it in items],
              "image_format": image_format, "label_map": source.label_map_name, "centroid_tile": tile,
              "count": len(samples), "samples": samples, "skipped": skipped}
    if samples:
        record.update(bytes=tar_path.stat().st_size, sha256=_sha256(tar_path))
    else:
        record.update(bytes=0, sha256="")
    atomic.write_json(out_dir / f"{name}.json", record, indent=1, sort_keys=True)
    return record


def _completed(out_dir: Path, name: str, keys: list[str], image_format: str,
               label_map: str, tile: int = TILE) -> dict | None:
    """The sidecar of a finished shard matching this plan, or None (then it is rewritten)."""
    side = out_dir / f"{name}.json"
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if (rec.get("keys") != keys or rec.get("image_format") != image_format
            or rec.get("label_map") != label_map or rec.get("centroid_tile") != tile):
        return None
    tar_path = out_dir / f"{name}.tar"
    if rec.get("count", 0) == 0:
        return rec if not tar_path.exists() else None
    if not tar_path.is_file() or tar_path.stat().st_size != rec.get("bytes"):
        return None
    return rec if _sha256(tar_path) == rec.get("sha256") else None


def write_shards(source: Source, out_dir: str | os.PathLike, *, samples_per_shard: int = 64,
                 image_format: str = "png", workers: int = 1, progress: bool = True,
                 min_shards: int = DEFAULT_MIN_SHARDS, centroid_tile: int = TILE,
                 shuffle_seed: int | None = SHUFFLE_SEED) -> dict:
    """Write ``source`` as WebDataset shards in ``out_dir`` and return the manifest.

    Resumable: completed shards are verified and kept. Pairs with mismatched sizes, unreadable
    files or ids outside the dataset's table are skipped and listed under ``skipped``.
    ``min_shards``: warn when fewer shards are written (ranks x loader workers of the launch).
    ``centroid_tile``: tile of the class-uniform centroids (whole tiles only; the released 1024).
    ``shuffle_seed``: the items (sorted by key) are permuted with this seed before they are cut into
    shards, so a shard holds frames from all over the split instead of consecutive (video-like)
    frame ids; None keeps key order. Recorded in the manifest.
    """
    _check_options(image_format, samples_per_shard, workers, centroid_tile)
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = shard_prefix(source)
    chunks = _cut(source.items, samples_per_shard, shuffle_seed)
    names = [f"{prefix}-{i:06d}" for i in range(len(chunks))]
    _remove_stale(out, prefix, names)
    records: dict[int, dict] = {}
    todo = []
    for i, (name, chunk) in enumerate(zip(names, chunks)):
        rec = _completed(out, name, [it.key for it in chunk], image_format,
                         source.label_map_name, centroid_tile)
        if rec is None:
            todo.append((i, (source, str(out), name, chunk, image_format, centroid_tile)))
        else:
            records[i] = rec
    reused = len(records)
    _write_all(todo, records, chunks, workers, f"shard {prefix}", progress)
    ordered = [records[i] for i in range(len(chunks))]
    manifest = _manifest(source, ordered, image_format=image_format, samples_per_shard=samples_per_shard,
                         centroid_tile=centroid_tile, shuffle_seed=shuffle_seed, min_shards=min_shards)
    atomic.write_json(out / "manifest.json", manifest, indent=1, sort_keys=True)
    if progress:
        _report(manifest, out, written=len(todo), reused=reused, seconds=time.time() - start)
    return manifest


def _check_options(image_format: str, samples_per_shard: int, workers: int, centroid_tile: int) -> None:
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' (lossless) or 'jpg', got {image_format!r}")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard and workers must be >= 1, got "
                         f"{samples_per_shard}, {workers}")
    if centroid_tile < 1:
        raise ValueError(f"centroid_tile must be >= 1, got {centroid_tile}")


def _cut(items, samples_per_shard: int, shuffle_seed: int | None) -> list[list[Item]]:
    """The items sorted by key, permuted with ``shuffle_seed`` (None: key order), cut into shards."""
    items = sorted(items, key=lambda it: it.key)
    if shuffle_seed is not None:
        order = np.random.default_rng(np.random.SeedSequence([int(shuffle_seed), 0x5B0FF1E])).permutation(len(items))
        items = [items[i] for i in order]
    return [items[i:i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]


def _remove_stale(out: Path, prefix: str, names: list[str]) -> None:
    """Interrupted runs leave temp files; shards of an older plan (other samples_per_shard) are
    stale. Both carry our prefix and are removed."""
    expected = {f"{n}{ext}" for n in names for ext in (".tar", ".json")}
    for p in out.glob(f"{prefix}-*"):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.(tar|json)(\.tmp-\d+)?", p.name) \
                and p.name not in expected:
            p.unlink()


def _write_all(todo: list, records: dict[int, dict], chunks: list, workers: int, desc: str,
               progress: bool) -> None:
    """Write the shards of ``todo`` ((index, task) pairs) into ``records``, in ``workers`` processes."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="img", disable=not progress)
    bar.update(sum(len(chunks[i]) for i in records))
    if workers == 1 or len(todo) <= 1:
        for i, task in todo:
            records[i] = _write_shard(task)
            bar.update(len(chunks[i]))
    else:
        with mp.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            index = {task[2]: i for i, task in todo}
            for rec in pool.imap_unordered(_write_shard, [t for _, t in todo]):
                i = index[rec["name"][:-4]]
                records[i] = rec
                bar.update(len(chunks[i]))
    bar.close()


def _manifest(source: Source, ordered: list[dict], *, image_format: str, samples_per_shard: int,
              centroid_tile: int, shuffle_seed: int | None, min_shards: int) -> dict:
    """The manifest from the shard records, in shard order."""
    shards = [{"name": r["name"], "count": r["count"], "bytes": r["bytes"], "sha256": r["sha256"]}
              for r in ordered if r["count"]]
    samples = [{k: s[k] for k in ("key", "shard", "size", "class_pixels", "centroids")}
               for r in ordered for s in r["samples"]]
    skipped = list(source.skipped) + [s for r in ordered for s in r["skipped"]]
    warnings = list(source.warnings)
    if len(shards) < min_shards:
        warnings.append(f"only {len(shards)} shards (< {min_shards} = ranks x loader workers of a "
                        f"typical launch, e.g. 8 GPUs x 2 workers): some loader workers would "
                        f"get no shard of their own; lower samples_per_shard "
                        f"(now {samples_per_shard})")
    if skipped:
        warnings.append(f"{len(skipped)} pairs skipped (see 'skipped')")
    return {"format": FORMAT, "tool_version": __version__, "dataset": source.name,
            "split": source.split, "label_map": source.label_map_name,
            "image_format": image_format, "samples_per_shard": samples_per_shard,
            "centroid_tile": centroid_tile, "shuffle_seed": shuffle_seed,
            "num_samples": len(samples), "shards": shards, "samples": samples,
            "skipped": skipped, "warnings": warnings}


def _report(manifest: dict, out: Path, *, written: int, reused: int, seconds: float) -> None:
    shards, skipped = manifest["shards"], manifest["skipped"]
    total = sum(s["bytes"] for s in shards)
    print(f"shards: {manifest['num_samples']} samples in {len(shards)} shards "
          f"({written} written, {reused} reused), {len(skipped)} skipped, "
          f"{total / 1e6:.1f} MB, {seconds:.1f}s -> {out}")
    for s in skipped[:5]:
        print(f"  skipped {s['key']}: {s['reason']}")
    if len(skipped) > 5:
        print(f"  ... and {len(skipped) - 5} more skipped (all {len(skipped)} under 'skipped' in "
              f"{out / 'manifest.json'})")
    for w in manifest["warnings"]:
        print(f"  warning: {w}")


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """Read ``<shard_dir>/manifest.json``; clear error when missing or not ours."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {shard_dir}: this is not a finished shard "
                                f"folder. Write it with data.shards.write_shards (a rerun "
                                f"resumes an interrupted run).")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun write_shards to rewrite it") \
            from None
    if not str(manifest.get("format", "")).startswith("blindseg-shards/"):
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not blindseg-shards; "
                         f"was this folder written by another tool?")
    return manifest


def verify_shards(shard_dir: str | os.PathLike) -> dict:
    """Re-hash every shard against the manifest -> {"ok", "checked", "bad": [{name, reason}]}."""
    manifest = load_manifest(shard_dir)
    bad = []
    for s in manifest["shards"]:
        path = Path(shard_dir) / s["name"]
        if not path.is_file():
            bad.append({"name": s["name"], "reason": "missing"})
        elif path.stat().st_size != s["bytes"]:
            bad.append({"name": s["name"], "reason": f"size {path.stat().st_size} != {s['bytes']}"})
        elif _sha256(path) != s["sha256"]:
            bad.append({"name": s["name"], "reason": "sha256 mismatch"})
        else:
            samples, error = index_shard(str(path))
            if error is not None:
                bad.append({"name": s["name"], "reason": error})
            elif len(samples) != s["count"]:
                bad.append({"name": s["name"], "reason": f"{len(samples)} samples != {s['count']}"})
    return {"ok": not bad, "checked": len(manifest["shards"]), "bad": bad}
