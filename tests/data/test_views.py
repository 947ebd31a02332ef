import numpy as np
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
    meta = {"centroids": class_centroids(label)}
    t = TwoViewTransform(crop_size=32)
    a = t(image, label, meta, np.random.default_rng(7))
    b = t(image, label, meta, np.random.default_rng(7))
    c = t(image, label, meta, np.random.default_rng(8))
    assert a[0].shape == a[1].shape == (3, 32, 32) and a[2].shape == (32, 32)
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.float32 and a[2].dtype == torch.int64
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_views_share_geometry_but_differ_photometrically():
    image, label = make_frame(60, 80, 2)
    meta = {"centroids": class_centroids(label)}
    t = TwoViewTransform(crop_size=48, scale_range=(0.9, 1.6))
    plain = TwoViewTransform(crop_size=48, scale_range=(0.9, 1.6), jitter_orig=(0, 0, 0, 0),
                             jitter_aug=(0, 0, 0, 0), blur_sigma=(0, 0))
    for seed in range(6):
        x, xa, y = t(image, label, meta, np.random.default_rng(seed))
        img_c, lab_c, _ = t.crop(image, label, meta, np.random.default_rng(seed))
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
        p, pa, py = plain(image, label, meta, np.random.default_rng(seed))
        assert torch.equal(p, pa)
        ref = (torch.from_numpy(img_c).permute(2, 0, 1).float() / 255 - MEAN) / STD
        assert torch.allclose(p, ref, atol=1e-5) and torch.equal(py, y)


def test_padding_when_scaled_frame_is_smaller():
    image, label = make_frame(20, 30, 3)
    t = TwoViewTransform(crop_size=64, scale_range=(1.0, 1.0), class_uniform=0.0)
    img_c, lab_c, g = t.crop(image, label, None, np.random.default_rng(0))
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
    t = TwoViewTransform(crop_size=32, scale_range=(1.0, 1.0), class_uniform=0.0)
    flips = set()
    for seed in range(12):
        img_c, lab_c, g = t.crop(image, label, None, np.random.default_rng(seed))
        assert np.array_equal(img_c[..., 0], lab_c * 4)  # the image pixel matches its label pixel
        step = int(lab_c[0, 1]) - int(lab_c[0, 0])
        assert step == (-1 if g["flip"] else 1)
        flips.add(g["flip"])
    assert flips == {True, False}


def test_class_uniform_crop_contains_chosen_centroid():
    h, w = 200, 300
    label = np.full((h, w), 0, np.uint8)
    label[20:40, 250:280] = 11  # small blobs far apart
    label[160:190, 10:30] = 13
    label[100:110, 140:150] = 6
    image = np.zeros((h, w, 3), np.uint8)
    cents = class_centroids(label, tile=1024)
    meta = {"centroids": {k: cents[k] for k in ("11", "13")}}  # only listed classes may be chosen
    t = TwoViewTransform(crop_size=64, scale_range=(0.5, 2.0), class_uniform=1.0)
    chosen = set()
    for seed in range(30):
        _, lab_c, g = t.crop(image, label, meta, np.random.default_rng(seed))
        cls, (cy, cx) = g["chosen"]
        chosen.add(cls)
        yy = cy * g["scale"] - g["y0"] + g["py"]
        xx = cx * g["scale"] - g["x0"] + g["px"]
        if g["flip"]:
            xx = 63 - xx
        assert 0 <= yy < 64 and 0 <= xx < 64
        assert (lab_c == cls).any()
    assert chosen == {11, 13}
    # without precomputed centroids they are computed from the label (tile convention)
    _, _, g = t.crop(image, label, None, np.random.default_rng(0))
    assert g["chosen"][0] in (0, 6, 11, 13)
    # class_uniform=0 never uses a centroid
    assert TwoViewTransform(crop_size=64, class_uniform=0.0).sample_geometry((h, w), meta, np.random.default_rng(0))["chosen"] is None


def test_class_centroids_tile_convention():
    label = np.full((4, 8), 255, np.uint8)
    label[0:2, 0:2] = 3
    label[2:4, 6:8] = 3
    label[1, 4] = 5
    c = class_centroids(label, tile=4)
    assert c == {"3": [[0, 0], [2, 6]], "5": [[1, 4]]}


def test_window_resampling_equals_full_resize_then_crop():
    import cv2
    image, label = make_frame(90, 150, 9)
    image = cv2.GaussianBlur(image, (7, 7), 2)  # smooth content: cubic rounding only
    t = TwoViewTransform(crop_size=64, class_uniform=0.5)
    for seed in range(8):
        ic, lc, g = t.crop(image, label, None, np.random.default_rng(seed))
        hs, ws = g["scaled_hw"]
        full = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_CUBIC)
        full_l = cv2.resize(label, (ws, hs), interpolation=cv2.INTER_NEAREST_EXACT)
        y0, x0, ch, cw, py, px = (g[k] for k in ("y0", "x0", "ch", "cw", "py", "px"))
        ref, ref_l = full[y0:y0 + ch, x0:x0 + cw], full_l[y0:y0 + ch, x0:x0 + cw]
        if g["flip"]:
            ref, ref_l = ref[:, ::-1], ref_l[:, ::-1]
        assert np.abs(ic[py:py + ch, px:px + cw].astype(int) - ref).max() <= 1
        assert np.array_equal(lc[py:py + ch, px:px + cw], ref_l)
