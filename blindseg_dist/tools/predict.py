"""`blindseg predict`: colour-coded masks and overlays of a folder of images with a checkpoint.

Every image (png/jpg/jpeg, any size, sub-folders kept) is predicted at full resolution (single
scale, as the evaluation) and written as OUT/masks/<name>.png (Cityscapes colours),
OUT/overlays/<name>.png (alpha blend of image and mask) and OUT/labels/<name>.png (trainIds 0..18).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(folder: str | Path) -> list[Path]:
    """The images under ``folder`` (recursive, sorted); a clear error when there are none."""
    src = Path(folder)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {str(src)!r} does not exist or is not a folder; "
                                "pass --images DIR holding .png/.jpg files")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"image folder {str(src)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images; "
                                "pass the folder that holds the images")
    return files


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * mask, uint8 HWC."""
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path, *, alpha: float = 0.5,
                   sliding_window: list[int] | None = None, device: str | None = None,
                   progress: bool = True) -> dict:
    """Predict every image of ``images`` with ``checkpoint``; returns a summary dict."""
    from PIL import Image
    from tqdm import tqdm

    from ..data.labels import CLASS_NAMES, NUM_CLASSES, colorize
    from ..data.views import normalize, to_unit_float
    from ..engine.evaluate import make_predictor
    from .evaluate_cli import load_checkpoint_model

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha {alpha}: must be in [0, 1]")
    files = list_images(images)
    _, net = load_checkpoint_model(checkpoint)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(dev).eval()
    predict = make_predictor(sliding_window)
    src, out = Path(images), Path(out)
    pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    t0 = time.perf_counter()
    for f in tqdm(files, desc="predict", unit="img", disable=not progress):
        try:
            with Image.open(f) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from None
        h, w = rgb.shape[:2]
        x = normalize(to_unit_float(rgb))[None].to(dev)  # (1, 3, H, W)
        with torch.no_grad():
            pred = predict(net, x, (h, w)).argmax(1)[0].to(torch.uint8).cpu().numpy()  # (H, W)
        pixels += np.bincount(pred.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        mask = colorize(pred)
        rel = f.relative_to(src).with_suffix(".png")
        for sub, arr in (("masks", mask), ("overlays", overlay(rgb, mask, alpha)), ("labels", pred)):
            dst = out / sub / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(dst)
    seconds = time.perf_counter() - t0
    frac = pixels / max(1, pixels.sum())
    top = [(CLASS_NAMES[i], float(frac[i])) for i in np.argsort(-frac)[:5] if frac[i] > 0]
    summary = {"images": len(files), "seconds": seconds, "out": str(out), "checkpoint": str(checkpoint),
               "class_fraction": {CLASS_NAMES[i]: float(frac[i]) for i in range(NUM_CLASSES)}}
    print(f"[predict] {len(files)} image(s) in {seconds:.1f} s ({len(files) / max(seconds, 1e-9):.2f} img/s); "
          f"masks {out / 'masks'}, overlays {out / 'overlays'}, trainIds {out / 'labels'}")
    print("[predict] most predicted classes: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in top))
    return summary
