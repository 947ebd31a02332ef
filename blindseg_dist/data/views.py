"""The two training views of BlindNet (docs/METHOD.md, "Views").

One shared geometric transform (random scale of the full frame, class-uniform or random crop,
horizontal flip) is applied once to the uint8 frame; the original view x and the augmented view
x_a are then derived from that same crop with independent photometric transforms.

Speed: the crop window is computed in source coordinates. Enlarging resamples only that window
(one cv2.warpAffine per image/label), never the whole scaled frame; shrinking resizes the whole
frame with PIL's antialiased bicubic (``resize_bicubic``; the result is no larger than the source)
and cuts the window out of it; labels are always resampled nearest on the window. Photometric ops run on the
768x768 crop in float32 with OpenCV. All randomness comes from the rng passed to the call.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE, TILE, class_stats

JITTER_ORIG = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue of the original view
JITTER_ORIG_P = 0.5  # RandomApply probability of the original view's jitter
JITTER_AUG = (0.8, 0.8, 0.8, 0.3)  # the augmented view's jitter (always applied)
BLUR_SIGMA = (0.15, 1.15)  # sigma = BLUR_SIGMA[0] + U[0, 1) * BLUR_SIGMA[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GRAY = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # torchvision rgb_to_grayscale weights


def class_centroids(label: np.ndarray, tile: int = TILE) -> dict[str, list[list[int]]]:
    """Class-uniform centroids (the released convention), as the sharder stores them in meta.json:
    {"<c>": [[y, x], ...]}, the integer centroid of class c in every whole tile x tile tile holding
    it (a frame smaller than a tile in either direction has none)."""
    return class_stats(label, tile)[1]


def resize_bicubic(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 HxWx3 -> uint8 (h, w, 3) with PIL's bicubic (``Image.resize(..., BICUBIC)``, what the
    released transforms use): a = -0.5 and, when shrinking, the kernel widened by the factor, i.e.
    antialiased. torch's antialiased interpolate implements that filter (within 1 grey level of
    Pillow when shrinking, 2 when enlarging: tests/data/test_views.py)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # channels-last uint8 fast path
    out = F.interpolate(t, size=(int(hw[0]), int(hw[1])), mode="bicubic", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def blur_ksize(sigma: float) -> int:
    """Odd kernel size truncating the Gaussian at 4 sigma."""
    return 2 * int(math.ceil(4.0 * sigma)) + 1


def _factor_range(v: float, center: float = 1.0) -> tuple[float, float] | None:
    """torchvision ColorJitter: a factor b means U[max(0, 1-b), 1+b]; 0 disables the op."""
    if v <= 0:
        return None
    return (max(0.0, center - v), center + v)


def color_jitter(img: np.ndarray, jitter: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """ColorJitter with torchvision semantics on a float32 RGB HxWx3 image in [0, 1].

    Factors: brightness/contrast/saturation in U[max(0, 1-b), 1+b], hue shift in U[-h, h];
    the four ops in a random order (a random permutation, as torchvision); an op with parameter 0
    is skipped. Every op clamps to [0, 1] like torchvision on float images.
    """
    b, c, s, h = jitter
    order = rng.permutation(4)
    ranges = [_factor_range(b), _factor_range(c), _factor_range(s), (-h, h) if h > 0 else None]
    factors = [None if r is None else float(rng.uniform(r[0], r[1])) for r in ranges]
    for op in order:
        f = factors[op]
        if f is None:
            continue
        if op == 0:  # brightness: blend with black
            img = cv2.multiply(img, (f, f, f, 0))
        elif op == 1:  # contrast: blend with the mean grey level of the image
            mean = float(cv2.mean(cv2.transform(img, _GRAY[None]))[0])
            img = cv2.addWeighted(img, f, img, 0.0, (1.0 - f) * mean)
        elif op == 2:  # saturation: blend with the greyscale image
            gray = cv2.transform(img, _GRAY[None])  # (H, W)
            gray3 = cv2.merge([gray, gray, gray])
            img = cv2.addWeighted(img, f, gray3, 1.0 - f, 0.0)
        else:  # hue: rotate the hue channel by f turns
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # float32: H in [0, 360)
            hch = hsv[..., 0]
            hch += f * 360.0
            hch %= 360.0
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        np.clip(img, 0.0, 1.0, out=img)
    return img


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, sigma_law: Sequence[float] = BLUR_SIGMA) -> np.ndarray:
    """Gaussian blur with sigma = sigma_law[0] + U[0, 1) * sigma_law[1] (a sigma <= 0 is a no-op)."""
    sigma = sigma_law[0] + float(rng.random()) * sigma_law[1]
    if sigma <= 0:
        return img
    k = blur_ksize(sigma)
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma)


_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)


def normalize(img: np.ndarray) -> torch.Tensor:
    """float32 HxWx3 in [0, 1] -> ImageNet-normalized float32 tensor (3, H, W)."""
    img = cv2.multiply(cv2.subtract(img, tuple(_MEAN.tolist()) + (0.0,)), tuple((1.0 / _STD).tolist()) + (0.0,))
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def to_unit_float(img_u8: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 HxWx3 in [0, 1]."""
    return img_u8.astype(np.float32) * np.float32(1.0 / 255.0)


class TwoViewTransform:
    """(image uint8 HxWx3 RGB, label uint8 HxW, rng, centroid) -> (x, x_a, y).

    x, x_a: float32 (3, crop, crop) ImageNet-normalized; y: int64 (crop, crop), 255 = ignore.
    Geometry (shared): scale s ~ U[scale_range] of the full frame (bicubic image, antialiased when
    shrinking / nearest label), crop crop_size x crop_size, image padded with 0 and label with 255
    where the scaled frame is smaller (padding centred), horizontal flip with p=0.5. The crop is
    uniformly placed, or, for a class-uniform item (``centroid`` = (y, x) in source pixels, chosen
    by the epoch sampler, data/sampler.py), placed like the released RandomCrop: x0 ~ U[cx - cw + 1,
    cx] (likewise y0) on the scaled centroid, clamped into the scaled frame, so it contains it.
    Photometry: see JITTER_ORIG / JITTER_ORIG_P / JITTER_AUG / BLUR_SIGMA; passing zeros disables
    an op (used by the tests to look at the geometry alone).
    """

    def __init__(
        self,
        crop_size: int = 768,
        scale_range: tuple[float, float] = (0.5, 2.0),
        jitter_orig: Sequence[float] = JITTER_ORIG,
        jitter_orig_p: float = JITTER_ORIG_P,
        jitter_aug: Sequence[float] = JITTER_AUG,
        blur_sigma: Sequence[float] = BLUR_SIGMA,
    ):
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not (0 < scale_range[0] <= scale_range[1]):
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.jitter_orig = tuple(jitter_orig)
        self.jitter_orig_p = float(jitter_orig_p)
        self.jitter_aug = tuple(jitter_aug)
        self.blur_sigma = tuple(blur_sigma)

    # -- geometry ---------------------------------------------------------------------------
    def sample_geometry(self, hw: tuple[int, int], rng: np.random.Generator,
                        centroid: tuple[int, int] | None = None) -> dict:
        """Draw the shared geometry for a frame of size hw=(H, W). Returns a dict with the scale,
        the crop window (y0, x0) in scaled coordinates, the valid size (ch, cw) and its offset
        (py, px) inside the crop, the flip, and the centroid (y, x) the window contains, or None."""
        h, w = hw
        c = self.crop_size
        s = float(rng.uniform(*self.scale_range))
        hs, ws = max(1, int(round(h * s))), max(1, int(round(w * s)))
        ch, cw = min(c, hs), min(c, ws)
        py, px = (c - ch) // 2, (c - cw) // 2
        if centroid is not None:
            cy, cx = int(centroid[0]), int(centroid[1])
            if not (0 <= cy < h and 0 <= cx < w):
                raise ValueError(f"centroid {(cy, cx)} lies outside the {h}x{w} frame")
            cys, cxs = min(int(cy * hs / h), hs - 1), min(int(cx * ws / w), ws - 1)  # the scaled centroid
            y0 = min(max(int(rng.integers(cys - ch + 1, cys + 1)), 0), hs - ch)
            x0 = min(max(int(rng.integers(cxs - cw + 1, cxs + 1)), 0), ws - cw)
        else:
            y0 = int(rng.integers(hs - ch + 1))
            x0 = int(rng.integers(ws - cw + 1))
        flip = bool(rng.random() < 0.5)
        return {"scale": s, "y0": y0, "x0": x0, "ch": ch, "cw": cw, "py": py, "px": px,
                "flip": flip, "centroid": None if centroid is None else (int(centroid[0]), int(centroid[1])),
                "scaled_hw": (hs, ws)}

    def apply_geometry(self, image: np.ndarray, label: np.ndarray, g: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """Resample only the crop window: (crop, crop, 3) uint8 image and (crop, crop) uint8 label."""
        c = self.crop_size
        h, w = label.shape
        hs, ws = g["scaled_hw"]
        sy, sx = hs / h, ws / w  # the exact per-axis scale of the (virtual) resized frame
        ch, cw, y0, x0 = g["ch"], g["cw"], g["y0"], g["x0"]
        # dst (u, v) inside the valid window -> src (x, y), pixel-centre aligned like cv2.resize:
        #   x = (x0 + u' + 0.5) / sx - 0.5 with u' = u, or cw - 1 - u when flipped.
        if g["flip"]:
            m = np.array([[-1.0 / sx, 0.0, (x0 + cw - 1 + 0.5) / sx - 0.5],
                          [0.0, 1.0 / sy, (y0 + 0.5) / sy - 0.5]])
        else:
            m = np.array([[1.0 / sx, 0.0, (x0 + 0.5) / sx - 0.5],
                          [0.0, 1.0 / sy, (y0 + 0.5) / sy - 0.5]])
        flags = cv2.WARP_INVERSE_MAP
        if hs < h or ws < w:
            # shrinking: PIL's antialiased bicubic of the whole frame (no larger than the source),
            # then the crop, as the released resize-then-crop; a plain cubic would alias
            img_c = resize_bicubic(image, (hs, ws))[y0:y0 + ch, x0:x0 + cw]
            img_c = np.ascontiguousarray(img_c[:, ::-1] if g["flip"] else img_c)
        else:  # enlarging: cubic on the crop window only (never the up-to-4x larger frame)
            img_c = cv2.warpAffine(image, m, (cw, ch), flags=cv2.INTER_CUBIC | flags, borderMode=cv2.BORDER_REPLICATE)
        lab_c = cv2.warpAffine(label, m, (cw, ch), flags=cv2.INTER_NEAREST | flags, borderMode=cv2.BORDER_REPLICATE)
        if ch == c and cw == c:
            return img_c, lab_c
        img_o = np.zeros((c, c, 3), dtype=np.uint8)
        lab_o = np.full((c, c), IGNORE, dtype=np.uint8)
        py, px = g["py"], g["px"]
        img_o[py:py + ch, px:px + cw] = img_c
        lab_o[py:py + ch, px:px + cw] = lab_c
        return img_o, lab_o

    def crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
             centroid: tuple[int, int] | None = None):
        """Geometry only: (uint8 crop image, uint8 crop label, geometry dict)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
        if label.ndim != 2 or label.shape != image.shape[:2]:
            raise ValueError(f"label must be HxW matching the image {image.shape[:2]}, got {label.shape}")
        g = self.sample_geometry(label.shape, rng, centroid)
        img_c, lab_c = self.apply_geometry(image, label, g)
        return img_c, lab_c, g

    # -- the two views ----------------------------------------------------------------------
    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 centroid: tuple[int, int] | None = None, return_geometry: bool = False):
        img_c, lab_c, g = self.crop(image, label, rng, centroid)
        base = to_unit_float(img_c)
        # original view: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.5) -> blur -> normalize
        x = base.copy()
        if float(rng.random()) < self.jitter_orig_p:
            x = color_jitter(x, self.jitter_orig, rng)
        x = gaussian_blur(x, rng, self.blur_sigma)
        # augmented view: ColorJitter(0.8, 0.8, 0.8, 0.3) always -> its own blur -> normalize
        xa = color_jitter(base, self.jitter_aug, rng)
        xa = gaussian_blur(xa, rng, self.blur_sigma)
        y = torch.from_numpy(lab_c.astype(np.int64))
        if return_geometry:
            return normalize(x), normalize(xa), y, g
        return normalize(x), normalize(xa), y
