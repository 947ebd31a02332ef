"""Samples/s per CPU core of the two-view training pipeline (decode + class-uniform crop 768 +
both views' photometric transforms) on 1914x1052 frames: read from shards through the training
loader (num_workers=0, one thread) vs read from a raw PNG folder with the same transform, and the
same shards streamed over HTTP from a local server (`python -m http.server` on 127.0.0.1, in its
own process; the CPU of the curl processes that fetch the shards is counted, the server's is not).

    .venv/bin/python bench/data_throughput.py [--frames 32] [--samples 64] [--out bench/results/data_throughput.json]

Anchor: the reference pipeline runs at 0.69 samples/s per core; goal >= 3.5.
Cores one GPU needs = images/s the GPU consumes / samples/s per core, assuming a GPU step of
--gpu-step-s (0.5 s) for --gpu-batch (4) images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds

from blindseg_dist.data.labels import IGNORE
from blindseg_dist.data.stream import decode_image, decode_label, make_train_loader
from blindseg_dist.data.views import TwoViewTransform, class_centroids

REFERENCE = 0.69  # samples/s/core of the reference pipeline
GOAL = 3.5


def synth_frame(rng: np.random.Generator, h: int = 1052, w: int = 1914):
    """A street-like frame with structure: sky/building/road bands, blocks, gradients, texture."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    label = np.full((h, w), 10, np.uint8)  # sky
    horizon = int(h * rng.uniform(0.35, 0.5))
    label[horizon:] = 0  # road
    label[horizon:, : int(w * 0.15)] = 1  # sidewalk
    for _ in range(int(rng.integers(6, 12))):  # buildings / vegetation / cars / poles / persons
        c = int(rng.choice([2, 8, 13, 5, 11, 7, 4]))
        bw, bh = int(rng.integers(20, 400)), int(rng.integers(40, 500))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(max(0, horizon - bh), h - bh))
        label[y0:y0 + bh, x0:x0 + bw] = c
    label[-40:, :] = IGNORE  # ego vehicle
    lut = rng.integers(0, 256, (256, 3)).astype(np.float32)
    image = lut[label] * (0.6 + 0.4 * (yy / h))[..., None] + 30 * np.sin(xx / rng.uniform(20, 80))[..., None]
    image += rng.normal(0, 6, (h, w, 3)).astype(np.float32)  # sensor noise: realistic PNG sizes
    return np.clip(image, 0, 255).astype(np.uint8), label


def png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr)
    assert ok
    return buf.tobytes()


def build_data(root: Path, n: int, per_shard: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    (root / "raw" / "images").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "labels").mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir(exist_ok=True)
    metas, shards, samples = {}, [], []
    writer = None
    for i in range(n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            name = f"bench-{i // per_shard:06d}.tar"
            shards.append({"name": name, "count": min(per_shard, n - i)})
            writer = wds.TarWriter(str(root / "shards" / name))
        key = f"{i:05d}"
        image, label = synth_frame(rng)
        ib, lb = png(image), png(label)
        (root / "raw" / "images" / f"{key}.png").write_bytes(ib)
        (root / "raw" / "labels" / f"{key}.png").write_bytes(lb)
        meta = {"key": key, "size": list(label.shape), "centroids": class_centroids(label),
                "class_pixels": {str(int(c)): int((label == c).sum()) for c in np.unique(label) if c != IGNORE}}
        metas[key] = meta
        writer.write({"__key__": key, "image.png": ib, "label.png": lb, "meta.json": json.dumps(meta).encode()})
        samples.append({"key": key, "shard": shards[-1]["name"], "size": meta["size"],
                        "class_pixels": meta["class_pixels"], "centroids": meta["centroids"]})
    writer.close()
    for s in shards:
        s["bytes"] = (root / "shards" / s["name"]).stat().st_size
    manifest = {"format": "blindseg-shards/1", "tool_version": "bench", "dataset": "bench-synthetic",
                "split": "train", "label_map": "trainid", "image_format": "png", "num_samples": n,
                "shards": shards, "samples": samples, "skipped": [], "warnings": []}
    (root / "shards" / "manifest.json").write_text(json.dumps(manifest))
    return metas


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench_shards(location, samples: int, batch: int, crop: int) -> dict:
    """The training loader over ``location`` (a folder or URL); CPU = this process + finished children
    (the curl pipes of http shards)."""
    loader = make_train_loader(location, batch_size=batch, crop_size=crop, num_workers=0, seed=0,
                               epoch_batches=4)
    it = iter(loader)
    next(it)  # warm-up (indexing, first decode)
    steps = max(1, samples // batch)
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    for _ in range(steps):
        next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it, loader  # close open shard streams: their curl processes are reaped and counted
    import gc

    gc.collect()
    child = _children_cpu() - k0
    return {"samples": steps * batch, "wall_s": wall, "cpu_s": cpu + child, "child_cpu_s": child,
            "samples_per_s_wall": steps * batch / wall, "samples_per_s_cpu": steps * batch / (cpu + child)}


def http_server(folder: Path):
    """`python -m http.server` serving ``folder`` on 127.0.0.1 in its own process -> (process, URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _centroid(meta: dict, i: int):
    """Every other sample class-uniform (like data.class_uniform 0.5): a centroid of one of its classes."""
    cents = [tuple(c) for v in meta["centroids"].values() for c in v]
    return cents[i % len(cents)] if cents and i % 2 else None


def bench_raw(root: Path, metas: dict, samples: int, crop: int) -> dict:
    keys = sorted(metas)
    t = TwoViewTransform(crop_size=crop)
    rng = np.random.default_rng(0)
    dec = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(samples):
        key = keys[int(rng.integers(len(keys)))]
        d0 = time.perf_counter()
        image = cv2.cvtColor(cv2.imread(str(root / "raw" / "images" / f"{key}.png"), cv2.IMREAD_COLOR),
                             cv2.COLOR_BGR2RGB)
        label = cv2.imread(str(root / "raw" / "labels" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        dec += time.perf_counter() - d0
        t(image, label, np.random.default_rng(i), centroid=_centroid(metas[key], i))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples": samples, "wall_s": wall, "cpu_s": cpu, "decode_s": dec,
            "samples_per_s_wall": samples / wall, "samples_per_s_cpu": samples / cpu}


def bench_stages(root: Path, metas: dict, n: int, crop: int) -> dict:
    """Per-stage CPU milliseconds per sample (decode, geometry, photometry of both views)."""
    key = sorted(metas)[0]
    ib = (root / "raw" / "images" / f"{key}.png").read_bytes()
    lb = (root / "raw" / "labels" / f"{key}.png").read_bytes()
    t = TwoViewTransform(crop_size=crop)
    out = {}
    s = time.process_time()
    for _ in range(n):
        image, label = decode_image(ib), decode_label(lb)
    out["decode_ms"] = (time.process_time() - s) / n * 1e3
    s = time.process_time()
    for i in range(n):
        t.crop(image, label, np.random.default_rng(i), centroid=_centroid(metas[key], i))
    out["geometry_ms"] = (time.process_time() - s) / n * 1e3
    s = time.process_time()
    for i in range(n):
        t(image, label, np.random.default_rng(i), centroid=_centroid(metas[key], i))
    out["transform_total_ms"] = (time.process_time() - s) / n * 1e3
    out["photometric_ms"] = out["transform_total_ms"] - out["geometry_ms"]
    out["png_bytes_image"] = len(ib)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=768)
    ap.add_argument("--gpu-step-s", type=float, default=0.5)
    ap.add_argument("--gpu-batch", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="where to write the frames (default: a temp folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        metas = build_data(root, args.frames)
        print(f"wrote {args.frames} synthetic 1914x1052 frames (raw PNG + shards) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        stages = bench_stages(root, metas, 8, args.crop)
        shards = bench_shards(root / "shards", args.samples, args.batch, args.crop)
        raw = bench_raw(root, metas, args.samples, args.crop)
        server, url = http_server(root / "shards")
        try:
            http = bench_shards(url, args.samples, args.batch, args.crop)
        finally:
            server.terminate()
            server.wait()

    need = args.gpu_batch / args.gpu_step_s  # images/s one GPU consumes
    rows = []
    for name, r in (("shards (loader, 1 thread)", shards), ("raw folder (cv2 PNG, 1 thread)", raw),
                    ("shards over HTTP (local server)", http)):
        per_core = r["samples_per_s_cpu"]
        rows.append({"pipeline": name, "samples_per_s_per_core": per_core,
                     "samples_per_s_wall": r["samples_per_s_wall"], "speedup_vs_reference": per_core / REFERENCE,
                     "cores_per_gpu": need / per_core, **r})
    print(f"\n{'pipeline':34s} {'samples/s/core':>14s} {'wall s/s':>9s} {'x ref':>7s} {'cores/GPU':>10s}")
    print(f"{'reference (anchor)':34s} {REFERENCE:14.2f} {'':>9s} {1.0:7.2f} {need / REFERENCE:10.1f}")
    for r in rows:
        print(f"{r['pipeline']:34s} {r['samples_per_s_per_core']:14.2f} {r['samples_per_s_wall']:9.2f} "
              f"{r['speedup_vs_reference']:7.2f} {r['cores_per_gpu']:10.1f}")
    print(f"\nper sample: decode {stages['decode_ms']:.1f} ms, geometry {stages['geometry_ms']:.1f} ms, "
          f"photometry (2 views) {stages['photometric_ms']:.1f} ms; image PNG {stages['png_bytes_image'] / 1e6:.2f} MB")
    print(f"assumption: one GPU step of {args.gpu_step_s} s per {args.gpu_batch} images = {need:.0f} images/s per GPU;"
          f" goal >= {GOAL} samples/s/core: {'met' if rows[0]['samples_per_s_per_core'] >= GOAL else 'NOT met'}")
    result = {"frames": args.frames, "frame_size": [1052, 1914], "crop": args.crop, "batch": args.batch,
              "threads": 1, "reference_samples_per_s_per_core": REFERENCE, "goal_samples_per_s_per_core": GOAL,
              "gpu_assumption": {"step_s": args.gpu_step_s, "images_per_step": args.gpu_batch,
                                 "images_per_s": need},
              "stages_ms": stages, "results": rows,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "opencv": cv2.__version__, "torch": torch.__version__},
              "note": "samples/s per core = samples / process CPU time (with the curl children of the HTTP "
                      "row; the machine may be shared); wall = samples / elapsed time"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
