"""The image corruptions of `blindseg corrupt` (the ``imagecorruptions`` package's, in its order), their
severities and the CPU cost of each: what tools/corrupt.py writes, the order in which `blindseg eval`
lists a corrupted family's sets (engine/evaluate.py) and the table of `blindseg corrupt --help`.

A leaf module (standard library only), so that the command line's help does not load numpy."""
from __future__ import annotations

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression")  # the 15 of the benchmark (``all``), in the package's order
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # the package's 4 held-out ("validation") ones
SEVERITIES = (1, 2, 3, 4, 5)

# CPU seconds per image at severity 3, one thread of a 2-core CPU, on a 192x384 RGB frame (the demo's size)
# and on a 1024x2048 one (Cityscapes): `python bench/corruption_speed.py [--size 1024x2048]`
# (bench/results/corruption_speed.json, corruption_speed_1024x2048.json).
SECONDS_PER_IMAGE = {
    "gaussian_noise": 0.0132, "shot_noise": 0.0214, "impulse_noise": 0.0091, "defocus_blur": 0.0100,
    "glass_blur": 0.0391, "motion_blur": 0.0156, "zoom_blur": 0.1375, "snow": 0.0179, "frost": 0.0183,
    "fog": 0.0166, "brightness": 0.0456, "contrast": 0.0042, "elastic_transform": 0.0255, "pixelate": 0.0009,
    "jpeg_compression": 0.0013, "speckle_noise": 0.0073, "gaussian_blur": 0.0081, "spatter": 0.0119,
    "saturate": 0.0573,
}
SECONDS_PER_IMAGE_1024X2048 = {
    "gaussian_noise": 0.3088, "shot_noise": 0.4439, "impulse_noise": 0.1379, "defocus_blur": 0.1440,
    "glass_blur": 0.9611, "motion_blur": 0.6876, "zoom_blur": 3.5831, "snow": 0.7026, "frost": 0.0786,
    "fog": 0.1807, "brightness": 1.9576, "contrast": 0.1142, "elastic_transform": 1.5982, "pixelate": 0.0198,
    "jpeg_compression": 0.0167, "speckle_noise": 0.2363, "gaussian_blur": 0.2399, "spatter": 0.5383,
    "saturate": 2.4393,
}


def speed_table() -> str:
    """The help's table: each corruption, whether `all` takes it, CPU seconds per image at 192x384 and 1024x2048."""
    lines = [f"  {'corruption':<20}{'in all':>7}{'192x384':>10}{'1024x2048':>11}"]
    for name in (*STANDARD, *EXTRA):
        lines.append(f"  {name:<20}{'yes' if name in STANDARD else '':>7}{SECONDS_PER_IMAGE[name]:>10.3f}"
                     f"{SECONDS_PER_IMAGE_1024X2048[name]:>11.2f}")
    total = [sum(d[n] for n in STANDARD) for d in (SECONDS_PER_IMAGE, SECONDS_PER_IMAGE_1024X2048)]
    lines.append(f"  {'all (15)':<27}{total[0]:>10.3f}{total[1]:>11.2f}")
    return "\n".join(lines)
