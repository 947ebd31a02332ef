"""Evaluation protocols (docs/METHOD.md, "Evaluation protocol"): SYNTHIA mIoU19 / mIoU16, protocol resolution and
validation, the Mapillary resize / centre crop / ignore padding, and sliding-window inference."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from blindseg_dist.config import ConfigError, load_config
from blindseg_dist.data.labels import CLASS_NAMES, IGNORE
from blindseg_dist.engine.evaluate import (SYNTHIA16, _window_starts, make_predictor, predict_logits,
                                           resolve_protocol, sliding_window_logits, target_result)


# ---------------------------------------------------------------- SYNTHIA 19 / 16

def test_synthia_reports_miou19_and_miou16():
    cm = torch.zeros(19, 19, dtype=torch.int64)
    for c in range(19):
        if c not in (9, 14, 16):
            cm[c, c] = 10
    cm[0, 9] = 5  # road predicted as terrain: road IoU 10/15, terrain IoU 0 (FP only)
    res = target_result(cm, protocol="synthia")
    ious = [1.0] * 15 + [10 / 15]  # 16 classes: 15 perfect + road
    assert res["miou16"] == pytest.approx(np.mean(ious))
    assert res["miou"] == pytest.approx(np.mean(ious + [0.0]))  # 19-class nanmean: terrain 0, truck/train NaN
    assert res["per_class_iou"]["truck"] is None and res["per_class_iou"]["terrain"] == 0.0
    assert res["protocol"] == "synthia"
    assert [CLASS_NAMES[c] for c in range(19) if c not in SYNTHIA16] == ["terrain", "truck", "train"]
    assert "miou16" not in target_result(cm, protocol="full")


def test_protocol_resolution(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "synthia"}))
    assert resolve_protocol("target_b", tmp_path) == "synthia"  # from the shard manifest
    assert resolve_protocol("SYNTHIA-val", tmp_path / "nowhere") == "synthia"  # from the name
    assert resolve_protocol("mapillary", tmp_path / "nowhere") == "mapillary_1536"  # RobustNet default
    assert resolve_protocol("mapillary", tmp_path / "nowhere", {"mapillary": "mapillary_1024"}) == "mapillary_1024"
    assert resolve_protocol("night", tmp_path / "nowhere") == "full"
    assert resolve_protocol("target_b", tmp_path, {"target_b": "full"}) == "full"  # explicit wins


def test_eval_config_validation():
    cfg = load_config(None, ["eval.targets={mapillary: /d, synthia: /e}",
                             "eval.protocols={mapillary: mapillary_1024}", "eval.sliding_window=[512, 256]"])
    assert cfg.eval.protocols == {"mapillary": "mapillary_1024"} and cfg.eval.sliding_window == [512, 256]
    with pytest.raises(ConfigError, match=r"eval\.protocols\.mapillary.*mapillary_1536"):
        load_config(None, ["eval.targets={mapillary: /d}", "eval.protocols={mapillary: mapillary_768}"])
    with pytest.raises(ConfigError, match="no target 'bdd'"):
        load_config(None, ["eval.targets={mapillary: /d}", "eval.protocols={bdd: full}"])
    with pytest.raises(ConfigError, match="stride <= crop"):
        load_config(None, ["eval.sliding_window=[256, 512]"])
    with pytest.raises(ConfigError, match="sliding_window"):
        load_config(None, ["eval.sliding_window=[256, 128, 64]"])


# ---------------------------------------------------------------- sliding window

class _Ones(nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 19, *x.shape[-2:])


def test_window_starts_cover_the_image_and_end_at_the_border():
    assert _window_starts(70, 40, 24) == [0, 24, 30]
    assert _window_starts(64, 64, 32) == [0]
    assert _window_starts(100, 50, 25) == [0, 25, 50]


def test_sliding_window_as_large_as_the_image_is_whole_image_inference():
    from blindseg_dist.model import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", aux=False, proj_heads=False).eval()
    x = torch.randn(1, 3, 48, 80)
    whole = predict_logits(net, x, (48, 80))
    for window in ([48, 80, 16, 16], [96, 96]):  # exactly the image; larger than the image
        assert torch.equal(make_predictor(window)(net, x, (48, 80)), whole)
    # to a larger label size, both upsample the same way
    assert torch.equal(make_predictor([48, 80, 8, 8])(net, x, (96, 160)), predict_logits(net, x, (96, 160)))


def test_sliding_window_averages_overlaps():
    out = sliding_window_logits(_Ones(), torch.zeros(1, 3, 50, 70), (50, 70), crop=(24, 40), stride=(16, 24))
    assert torch.allclose(out, torch.ones_like(out))  # a plain sum would exceed 1 where windows overlap


def test_sliding_window_pointwise_net_equals_whole_image():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 19, 1)  # exactly translation-equivariant: every window agrees with the whole image
    x = torch.randn(1, 3, 50, 70)
    out = sliding_window_logits(net, x, (50, 70), crop=(24, 40), stride=(16, 24))
    assert torch.allclose(out, net(x), atol=1e-6)


def test_sliding_window_3x3_net_differs_only_at_inner_window_borders():
    """A 3x3 conv (receptive radius 1, zero padding) sees different context only on the 1-px band of a
    window's edges that lie inside the image; every other pixel must equal whole-image inference."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 19, 1))
    h, w, (ch, cw), (sh, sw) = 50, 70, (24, 40), (16, 24)
    with torch.no_grad():
        x = torch.randn(1, 3, h, w)
        out = sliding_window_logits(net, x, (h, w), crop=(ch, cw), stride=(sh, sw))
        whole = net(x)
    band = torch.zeros(h, w, dtype=torch.bool)
    for y in _window_starts(h, ch, sh):
        for x0 in _window_starts(w, cw, sw):
            win = torch.zeros(h, w, dtype=torch.bool)
            if y > 0:
                win[y, x0:x0 + cw] = True
            if y + ch < h:
                win[y + ch - 1, x0:x0 + cw] = True
            if x0 > 0:
                win[y:y + ch, x0] = True
            if x0 + cw < w:
                win[y:y + ch, x0 + cw - 1] = True
            band |= win
    diff = (out - whole).abs().amax(1)[0]  # (H, W)
    assert band.any() and (~band).sum() > h * w // 2
    assert diff[~band].max() < 1e-5
    assert diff[band].max() > 1e-4  # the band really differs: the check above is not vacuous
    # the averaged prediction still agrees almost everywhere
    assert (out.argmax(1) == whole.argmax(1)).float().mean() > 0.9


# ---------------------------------------------------------------- Mapillary (through the dataset)

def _mapillary_val(root, sizes):
    """A Mapillary v1.2 val folder: JPEG images and 8-bit palette labels, every pixel id 13 (Road)."""
    from PIL import Image

    (root / "validation" / "images").mkdir(parents=True)
    (root / "validation" / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "validation" / "images" / f"m{i}.jpg")
        lab = Image.fromarray(np.full((h, w), 13, np.uint8), mode="P")
        lab.putpalette([v for c in range(256) for v in (c, c, c)])
        lab.save(root / "validation" / "labels" / f"m{i}.png")


@pytest.mark.parametrize("protocol,height", [("mapillary_1024", 1024), ("mapillary_1536", 1536)])
def test_mapillary_portrait_is_padded_with_ignore(tmp_path, protocol, height):
    from blindseg_dist.data.shards import write_shards
    from blindseg_dist.data.sources import get_source
    from blindseg_dist.engine.evaluate import build_eval_dataset

    _mapillary_val(tmp_path / "mapillary", [(90, 60), (45, 100)])  # portrait, landscape
    write_shards(get_source("mapillary", tmp_path / "mapillary", split="val"), tmp_path / "shards",
                 samples_per_shard=2, progress=False)
    assert resolve_protocol("mapillary", tmp_path / "shards") == "mapillary_1536"  # the default
    ds = build_eval_dataset(tmp_path / "shards", protocol)
    items = {it["key"]: it for it in (ds[i] for i in range(len(ds)))}
    portrait = next(v for k, v in items.items() if k.endswith("m0"))
    landscape = next(v for k, v in items.items() if k.endswith("m1"))
    for it in (portrait, landscape):
        assert tuple(it["label"].shape) == (height, height) and tuple(it["image"].shape) == (3, height, height)
    lab = portrait["label"]
    resized_w = round(60 * height / 90)  # resized to the protocol height, then centre-cropped / padded
    pad = (height - resized_w) // 2
    assert (lab[:, : pad - 1] == IGNORE).all() and (lab[:, height - pad + 1:] == IGNORE).all()
    assert (lab[:, pad + 1: height - pad - 1] == 0).all()  # road (never padded with 0 = road)
    assert abs(int((lab == IGNORE).sum()) - (height - resized_w) * height) <= 2 * height
    assert (landscape["label"] == 0).all()  # wide images are only cropped
