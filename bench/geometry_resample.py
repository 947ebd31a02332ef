"""CPU ms per shrinking training crop (scale 0.5-1.0 of a 1914x1052 frame -> 768 crop, image and
label): the antialiased path of data/views.py (PIL's bicubic of the whole frame, then the window)
against a plain cubic window warp, side by side in one process, one thread.

    .venv/bin/python bench/geometry_resample.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_throughput import synth_frame  # noqa: E402

from blindseg_dist.data.views import TwoViewTransform  # noqa: E402


def warp_window(image, label, g):
    """The plain geometry: cubic (a = -0.75, no antialiasing) on the crop window only."""
    h, w = label.shape
    hs, ws = g["scaled_hw"]
    sx, sy = ws / w, hs / h
    m = np.array([[1.0 / sx, 0.0, (g["x0"] + 0.5) / sx - 0.5], [0.0, 1.0 / sy, (g["y0"] + 0.5) / sy - 0.5]])
    flags = cv2.WARP_INVERSE_MAP
    a = cv2.warpAffine(image, m, (g["cw"], g["ch"]), flags=cv2.INTER_CUBIC | flags, borderMode=cv2.BORDER_REPLICATE)
    b = cv2.warpAffine(label, m, (g["cw"], g["ch"]), flags=cv2.INTER_NEAREST | flags, borderMode=cv2.BORDER_REPLICATE)
    return a, b


def main(rounds: int = 3, crops: int = 40) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    image, label = synth_frame(np.random.default_rng(0))
    t = TwoViewTransform(crop_size=768, scale_range=(0.5, 1.0))
    gs = [t.sample_geometry(label.shape, np.random.default_rng(i)) for i in range(crops)]
    res = {"antialiased": [], "cubic_window": []}
    for _ in range(rounds):
        for name, fn in (("cubic_window", warp_window), ("antialiased", t.apply_geometry)):
            s = time.process_time()
            for g in gs:
                fn(image, label, g)
            res[name].append((time.process_time() - s) / len(gs) * 1e3)
    best = {k: round(min(v), 1) for k, v in res.items()}
    print(f"ms per shrinking crop (min of {rounds} rounds): {best}")
    return best


if __name__ == "__main__":
    main()
