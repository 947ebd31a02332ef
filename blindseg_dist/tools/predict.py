"""`blindseg predict`: colour-coded masks and overlays of a folder of images with a checkpoint.

Every image (png/jpg/jpeg, any size, sub-folders kept) is predicted at full resolution (single
scale, as the evaluation) and written as OUT/masks/<name>.png (Cityscapes colours),
OUT/overlays/<name>.png (alpha blend of image and mask) and OUT/labels/<name>.png (trainIds 0..18).
<name> is the image's path without its suffix; images that would share one (x.png and x.jpg) keep
their suffix (x.png.png, x.jpg.png). An image that cannot be read or predicted (corrupt, smaller
than MIN_SIDE pixels) is skipped and reported; the others are still written and the command exits
1 at the end. OUT may lie inside the image folder: what is under it is never read as input.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.labels import CLASS_NAMES, NUM_CLASSES, colorize
from ..data.views import normalize, to_unit_float
from ..engine.evaluate import make_predictor
from .evaluate_cli import load_checkpoint_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_SIDE = 8  # smaller images are skipped (the network downsamples by 16; 1x1 breaks its pooling)


def list_images(folder: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """The images under ``folder`` (recursive, sorted; none under ``exclude``, e.g. the output
    folder); a clear error when there are none."""
    src = Path(folder)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {str(src)!r} does not exist or is not a folder; "
                                "pass --images DIR holding .png/.jpg files")
    skip = Path(exclude).resolve() if exclude is not None else None
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not (skip is not None and p.resolve().is_relative_to(skip)))
    if not files:
        raise FileNotFoundError(f"image folder {str(src)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images; "
                                "pass the folder that holds the images")
    return files


def output_names(files: list[Path], src: Path) -> dict[Path, Path]:
    """Each image's output path relative to the output subfolders: its path with suffix .png, or,
    when two images would share that name (x.png, x.jpg), its full name + .png."""
    plain = {f: f.relative_to(src).with_suffix(".png") for f in files}
    count: dict[Path, int] = {}
    for rel in plain.values():
        count[rel] = count.get(rel, 0) + 1
    names = {f: (rel if count[rel] == 1 else f.relative_to(src).with_name(f.name + ".png")) for f, rel in plain.items()}
    taken: set[Path] = set()
    for f in files:  # a name still shared (x.jpg.png next to x.jpg and x.png): number it
        rel, k = names[f], 1
        while rel in taken:
            rel, k = names[f].with_name(f"{names[f].stem}-{k}.png"), k + 1
        names[f] = rel
        taken.add(rel)
    return names


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * mask, uint8 HWC."""
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _predict_image(net, predict, f: Path, dev: torch.device) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(RGB image, trainId prediction (H, W) uint8, None), or (image or None, None, why it is skipped)."""
    try:
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, None, f"cannot read it: {e}"
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        return rgb, None, f"{w}x{h} px, smaller than {MIN_SIDE} px on a side"
    x = normalize(to_unit_float(rgb))[None].to(dev)  # (1, 3, H, W)
    try:
        with torch.no_grad():
            return rgb, predict(net, x, (h, w)).argmax(1)[0].to(torch.uint8).cpu().numpy(), None
    except (RuntimeError, ValueError) as e:
        return rgb, None, f"prediction failed: {str(e).splitlines()[0]}"


def _write_outputs(out: Path, name: Path, rgb: np.ndarray, pred: np.ndarray, alpha: float) -> None:
    """OUT/masks, OUT/overlays and OUT/labels of one image."""
    mask = colorize(pred)
    for sub, arr in (("masks", mask), ("overlays", overlay(rgb, mask, alpha)), ("labels", pred)):
        dst = out / sub / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(dst)


def _report(summary: dict, files: list[Path], pixels: np.ndarray) -> None:
    """Print what was written, the most predicted classes and the skipped images."""
    done, seconds, out, skipped = summary["images"], summary["seconds"], Path(summary["out"]), summary["skipped"]
    frac = pixels / max(1, pixels.sum())
    top = [(CLASS_NAMES[i], float(frac[i])) for i in np.argsort(-frac)[:5] if frac[i] > 0]
    print(f"[predict] {done} image(s) in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} img/s); "
          f"masks {out / 'masks'}, overlays {out / 'overlays'}, trainIds {out / 'labels'}")
    print("[predict] most predicted classes: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in top))
    for item in skipped:
        print(f"[predict] skipped {item['image']}: {item['reason']}", file=sys.stderr)
    if skipped:
        print(f"[predict] {len(skipped)} of {len(files)} image(s) skipped (listed above)", file=sys.stderr)


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path, *, alpha: float = 0.5,
                   sliding_window: list[int] | None = None, device: str | None = None,
                   progress: bool = True) -> dict:
    """Predict every image of ``images`` with ``checkpoint``; returns a summary dict ("skipped":
    [{"image", "reason"}] for the images that could not be read or predicted)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha {alpha}: must be in [0, 1]")
    files = list_images(images, exclude=out)
    _, net = load_checkpoint_model(checkpoint)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(dev).eval()
    predict = make_predictor(sliding_window)
    src, out = Path(images), Path(out)
    pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    names = output_names(files, src)
    skipped: list[dict[str, str]] = []
    t0 = time.perf_counter()
    for f in tqdm(files, desc="predict", unit="img", disable=not progress):
        rgb, pred, why = _predict_image(net, predict, f, dev)
        if why is not None:
            skipped.append({"image": str(f), "reason": why})
            continue
        pixels += np.bincount(pred.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        _write_outputs(out, names[f], rgb, pred, alpha)
    frac = pixels / max(1, pixels.sum())
    summary = {"images": len(files) - len(skipped), "skipped": skipped, "seconds": time.perf_counter() - t0,
               "out": str(out), "checkpoint": str(checkpoint),
               "class_fraction": {CLASS_NAMES[i]: float(frac[i]) for i in range(NUM_CLASSES)}}
    _report(summary, files, pixels)
    return summary
