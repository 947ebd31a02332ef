"""The names of the image corruptions (the ``imagecorruptions`` package's, in its order) and their
severities: what `blindseg corrupt` writes (tools/corrupt.py) and the order in which `blindseg eval`
lists a corrupted family's sets (engine/evaluate.py)."""
from __future__ import annotations

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression")  # the 15 of the benchmark (``all``), in the package's order
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # the package's 4 held-out ("validation") ones
SEVERITIES = (1, 2, 3, 4, 5)
