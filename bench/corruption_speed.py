"""Seconds per image of each corruption of `blindseg corrupt` (imagecorruptions.corrupt with the per-image
seed of blindseg_dist/tools/corrupt.py), on frames of the synthetic source domain at the demo's size, one
process and one thread. The table of `blindseg corrupt --help` comes from this script.

    .venv/bin/python bench/corruption_speed.py [--size 192x384] [--images 4] [--repeats 3] [--severity 3]
        [--out bench/results/corruption_speed.json]

Each corruption is called once before timing (numba compiles glass_blur's pixel shuffle on its first call);
the figure is the median over repeats of the mean over the images, in CPU seconds of this one-thread process
(time.process_time: on a shared machine wall time also counts the other processes' turns; both are recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import cv2

    from blindseg_dist.data.sources.base import read_rgb
    from blindseg_dist.data.synth import generate
    from blindseg_dist.tools.corrupt import EXTRA, STANDARD, _package_version, corrupt_image, sample_seed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="192x384", help="HxW of the frames (default: the demo's 192x384)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--corruptions", default=",".join(STANDARD + EXTRA))
    p.add_argument("--out", default=str(ROOT / "bench/results/corruption_speed.json"))
    a = p.parse_args(argv)
    cv2.setNumThreads(1)
    h, w = (int(v) for v in a.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, domains=1, images_per_domain=a.images, size=(h, w), seed=0, progress=False)
        frames = [read_rgb(str(f)) for f in sorted((Path(tmp) / "gta5" / "images").glob("*.png"))]
    rows = []
    for name in a.corruptions.split(","):
        corrupt_image(frames[0], name, a.severity, 0)  # warm-up (numba compilation)
        cpu, wall = [], []
        for _ in range(a.repeats):
            t, t_wall = time.process_time(), time.perf_counter()
            for i, img in enumerate(frames):
                corrupt_image(img, name, a.severity, sample_seed(str(i), name, a.severity))
            cpu.append((time.process_time() - t) / len(frames))
            wall.append((time.perf_counter() - t_wall) / len(frames))
        rows.append({"corruption": name, "standard": name in STANDARD, "seconds_per_image": statistics.median(cpu),
                     "wall_seconds_per_image": statistics.median(wall)})
        print(f"{name:<20}{'standard' if name in STANDARD else 'extra':>10}{rows[-1]['seconds_per_image']:>10.4f} s CPU"
              f"{rows[-1]['wall_seconds_per_image']:>10.4f} s wall", flush=True)
    total = sum(r["seconds_per_image"] for r in rows if r["standard"])
    print(f"{'all 15 standard':<30}{total:>10.4f} s CPU per frame")
    result = {"command": "python bench/corruption_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "size": [h, w], "severity": a.severity, "images": a.images, "repeats": a.repeats,
              "package": _package_version(), "machine": {"cpu": platform.processor() or platform.machine(),
                                                         "cores": os.cpu_count(), "python": platform.python_version()},
              "threads": 1, "clock": "process CPU time (seconds_per_image); wall time beside it",
              "load_average_before": os.getloadavg()[0], "rows": rows, "standard_total_seconds_per_image": total}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
