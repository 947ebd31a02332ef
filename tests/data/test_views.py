import numpy as np
import pytest
import torch

from blindseg_dist.data import views as V
from blindseg_dist.data.views import TwoViewTransform, class_centroids
from tests.data._tiny_shards import make_frame

MEAN = torch.tensor(V.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(V.IMAGENET_STD).view(3, 1, 1)


def unnorm(x):  # (3, H, W) normalized -> [0, 1]
    return x * STD + MEAN


def test_constants():
    assert V.JITTER_ORIG == (0.4, 0.4, 0.4, 0.1)
    assert V.JITTER_AUG == (0.8, 0.8, 0.8, 0.3)
    assert V.JITTER_ORIG_P == 0.5
    assert V.BLUR_SIGMA == (0.15, 1.15)
    assert V.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert V.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert V.blur_ksize(0.15) == 3 and V.blur_ksize(1.3) == 13  # odd, truncated at 4 sigma


def test_shapes_dtypes_and_reproducible():
    image, label = make_frame(50, 70, 1)
    t = TwoViewTransform(crop_size=32)
    a = t(image, label, np.random.default_rng(7), centroid=(20, 30))
    b = t(image, label, np.random.default_rng(7), centroid=(20, 30))
    c = t(image, label, np.random.default_rng(8), centroid=(20, 30))
    assert a[0].shape == a[1].shape == (3, 32, 32) and a[2].shape == (32, 32)
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.float32 and a[2].dtype == torch.int64
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_views_share_geometry_but_differ_photometrically():
    image, label = make_frame(60, 80, 2)
    t = TwoViewTransform(crop_size=48, scale_range=(0.9, 1.6))
    plain = TwoViewTransform(crop_size=48, scale_range=(0.9, 1.6), jitter_orig=(0, 0, 0, 0),
                             jitter_aug=(0, 0, 0, 0), blur_sigma=(0, 0))
    for seed in range(6):
        x, xa, y = t(image, label, np.random.default_rng(seed))
        img_c, lab_c, _ = t.crop(image, label, np.random.default_rng(seed))
        assert torch.equal(y, torch.from_numpy(lab_c.astype(np.int64)))  # same crop as the geometry
        assert not torch.allclose(x, xa, atol=1e-3)  # photometrically different
        # both views are piecewise constant on the label's regions (same spatial structure)
        for view in (unnorm(x), unnorm(xa)):
            for c in torch.unique(y).tolist():
                m = torch.from_numpy(np.pad(lab_c == c, 0))
                core = m.clone()  # erode by 3 px to stay away from blur/interpolation at edges
                for dy in range(-3, 4):
                    for dx in range(-3, 4):
                        core &= torch.roll(m, (dy, dx), (0, 1))
                if core.sum() > 0:
                    assert view[:, core].std(dim=1).max() < 0.02
        # without photometric ops both views equal the normalized geometric crop
        p, pa, py = plain(image, label, np.random.default_rng(seed))
        assert torch.equal(p, pa)
        ref = (torch.from_numpy(img_c).permute(2, 0, 1).float() / 255 - MEAN) / STD
        assert torch.allclose(p, ref, atol=1e-5) and torch.equal(py, y)


def test_padding_when_scaled_frame_is_smaller():
    image, label = make_frame(20, 30, 3)
    t = TwoViewTransform(crop_size=64, scale_range=(1.0, 1.0))
    img_c, lab_c, g = t.crop(image, label, np.random.default_rng(0))
    assert img_c.shape == (64, 64, 3) and lab_c.shape == (64, 64)
    py, px = g["py"], g["px"]
    inside = np.zeros((64, 64), bool)
    inside[py:py + 20, px:px + 30] = True
    assert (lab_c[~inside] == 255).all() and (img_c[~inside] == 0).all()
    ref_l = label[:, ::-1] if g["flip"] else label
    ref_i = image[:, ::-1] if g["flip"] else image
    assert np.array_equal(lab_c[inside].reshape(20, 30), ref_l)
    assert np.array_equal(img_c[inside].reshape(20, 30, 3), ref_i)


def test_flip_consistent_between_image_and_label():
    h, w = 40, 64
    label = np.tile(np.arange(w, dtype=np.uint8), (h, 1))  # label = column index
    image = np.stack([label * 4, label * 2, 255 - label], -1).astype(np.uint8)
    t = TwoViewTransform(crop_size=32, scale_range=(1.0, 1.0))
    flips = set()
    for seed in range(12):
        img_c, lab_c, g = t.crop(image, label, np.random.default_rng(seed))
        assert np.array_equal(img_c[..., 0], lab_c * 4)  # the image pixel matches its label pixel
        step = int(lab_c[0, 1]) - int(lab_c[0, 0])
        assert step == (-1 if g["flip"] else 1)
        flips.add(g["flip"])
    assert flips == {True, False}


def test_class_uniform_crop_contains_the_centroid_like_released_randomcrop():
    """x0 ~ U[cx - cw + 1, cx] on the scaled centroid, clamped into the scaled frame (likewise y0)."""
    h, w = 200, 300
    label = np.zeros((h, w), np.uint8)
    label[20:40, 250:280] = 11
    image = np.zeros((h, w, 3), np.uint8)
    t = TwoViewTransform(crop_size=64, scale_range=(0.5, 2.0))
    for cy, cx in ((30, 265), (0, 0), (199, 299), (100, 150)):
        lo_hit = hi_hit = False
        for seed in range(300):
            g = t.sample_geometry((h, w), np.random.default_rng(seed), centroid=(cy, cx))
            hs, ws = g["scaled_hw"]
            cys, cxs = int(cy * hs / h), int(cx * ws / w)
            assert g["centroid"] == (cy, cx)
            assert 0 <= g["y0"] <= hs - g["ch"] and 0 <= g["x0"] <= ws - g["cw"]  # inside the frame
            assert g["y0"] <= cys < g["y0"] + g["ch"] and g["x0"] <= cxs < g["x0"] + g["cw"]  # contains it
            lo, hi = min(max(cxs - g["cw"] + 1, 0), ws - g["cw"]), min(cxs, ws - g["cw"])
            lo_hit |= g["x0"] == lo
            hi_hit |= g["x0"] == hi
        assert lo_hit and hi_hit  # both ends of the clamped range occur
    _, lab_c, g = t.crop(image, label, np.random.default_rng(0), centroid=(30, 265))
    assert (lab_c == 11).any()
    with pytest.raises(ValueError, match="outside"):
        t.sample_geometry((h, w), np.random.default_rng(0), centroid=(h, 0))


def test_class_centroids_tile_convention():
    label = np.full((4, 8), 255, np.uint8)
    label[0:2, 0:2] = 3
    label[2:4, 6:8] = 3
    label[1, 4] = 5
    c = class_centroids(label, tile=4)
    assert c == {"3": [[0, 0], [2, 6]], "5": [[1, 4]]}
    # only whole tiles count (released calc_tile_locations): the partial right/bottom strips have none
    big = np.full((6, 10), 255, np.uint8)
    big[0, 0] = 3
    big[5, 1] = 7  # bottom strip (rows 4-5)
    big[1, 9] = 7  # right strip (columns 8-9)
    assert class_centroids(big, tile=4) == {"3": [[0, 0]], "7": []}
    assert class_centroids(np.zeros((1052, 1914), np.uint8)) == {"0": [[511, 511]]}  # one GTA5 tile


def test_window_resampling_equals_full_resize_then_crop():
    import cv2
    from PIL import Image

    image, label = make_frame(90, 150, 9)
    image = cv2.GaussianBlur(image, (7, 7), 2)  # smooth content: cubic rounding only
    t = TwoViewTransform(crop_size=64)
    shrunk = enlarged = 0
    for seed in range(16):
        ic, lc, g = t.crop(image, label, np.random.default_rng(seed))
        hs, ws = g["scaled_hw"]
        if hs < 90:  # shrinking: PIL's antialiased bicubic, as the released Image.resize
            full = np.asarray(Image.fromarray(image).resize((ws, hs), Image.BICUBIC))
            shrunk += 1
        else:
            full = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_CUBIC)
            enlarged += 1
        full_l = cv2.resize(label, (ws, hs), interpolation=cv2.INTER_NEAREST_EXACT)
        y0, x0, ch, cw, py, px = (g[k] for k in ("y0", "x0", "ch", "cw", "py", "px"))
        ref, ref_l = full[y0:y0 + ch, x0:x0 + cw], full_l[y0:y0 + ch, x0:x0 + cw]
        if g["flip"]:
            ref, ref_l = ref[:, ::-1], ref_l[:, ::-1]
        assert np.abs(ic[py:py + ch, px:px + cw].astype(int) - ref).max() <= 1
        assert np.array_equal(lc[py:py + ch, px:px + cw], ref_l)  # labels: nearest on the window
    assert shrunk and enlarged


def _stripes(h, w):
    yy, xx = np.mgrid[:h, :w]
    pat = (np.sin(xx * 2.6) + np.cos(yy * 2.9) + np.sin((xx + yy) * 1.3)) * 60 + 128  # 2-3 px periods
    return np.stack([pat, 255 - pat, (xx * 7 + yy * 3) % 256], -1).clip(0, 255).astype(np.uint8)


def test_downscaling_antialiases_like_pil_bicubic():
    """A high-frequency pattern shrunk by the training crop and by the evaluation resize matches
    Pillow's BICUBIC (antialiased) within 1 grey level (mean < 0.05); a plain cubic, as before, is
    far off (aliasing). Labels stay nearest: no new class appears."""
    import cv2
    from PIL import Image

    from blindseg_dist.data.evalset import mapillary_protocol
    from blindseg_dist.data.views import resize_bicubic

    h, w = 150, 230
    image = _stripes(h, w)
    label = np.zeros((h, w), np.uint8)
    label[:, 1::2] = 7
    label[::3] = 13
    label[0, 0] = 255
    for s in (0.31, 0.5, 0.74):
        t = TwoViewTransform(crop_size=48, scale_range=(s, s))
        ic, lc, g = t.crop(image, label, np.random.default_rng(3))
        hs, ws = g["scaled_hw"]
        ref = np.asarray(Image.fromarray(image).resize((ws, hs), Image.BICUBIC)).astype(int)
        y0, x0, ch, cw, py, px = (g[k] for k in ("y0", "x0", "ch", "cw", "py", "px"))
        ref = ref[y0:y0 + ch, x0:x0 + cw][:, ::-1] if g["flip"] else ref[y0:y0 + ch, x0:x0 + cw]
        diff = np.abs(ic[py:py + ch, px:px + cw].astype(int) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.05, (s, diff.max(), diff.mean())
        plain = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_CUBIC)[y0:y0 + ch, x0:x0 + cw].astype(int)
        if g["flip"]:
            plain = plain[:, ::-1]
        assert np.abs(plain - ref).mean() > 10  # what the test catches: aliasing
        assert set(np.unique(lc[py:py + ch, px:px + cw]).tolist()) <= {0, 7, 13, 255}
    # the evaluation resize (Mapillary to height 1024 from ~3000 px, here 150 -> 64)
    img_e, lab_e = mapillary_protocol(64, crop=False)(image, label)
    ref = np.asarray(Image.fromarray(image).resize((img_e.shape[1], 64), Image.BICUBIC)).astype(int)
    assert np.abs(img_e.astype(int) - ref).max() <= 1
    assert set(np.unique(lab_e).tolist()) <= {0, 7, 13, 255}
    assert np.abs(resize_bicubic(image, (64, 98)).astype(int)
                  - np.asarray(Image.fromarray(image).resize((98, 64), Image.BICUBIC))).max() <= 1
