import cv2
import numpy as np
import pytest
from PIL import Image

from blindseg_dist.data.labels import CITYSCAPES_ID_TO_TRAIN, MAPILLARY_OPENSEG, \
    MAPILLARY_ROBUSTNET, SYNTHIA_ID_TO_TRAIN
from blindseg_dist.data.sources import LayoutError, SampleError, get_source
from tests.data._dataset_formats import CS_IDS, ids, rgb, save_gray_png, save_jpg, save_palette_png, \
    save_rgb_png, save_synthia_label, write_cityscapes


def _check_pair(src, item, image, raw, lut):
    img, lab = src.load_pair(item)
    assert img.dtype == np.uint8 and img.shape == image.shape
    assert lab.dtype == np.uint8 and lab.shape == raw.shape
    if image is not None and src.name not in ("bdd100k", "mapillary"):  # PNG: exact
        np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lab, lut[raw])


# ---- GTA5 -------------------------------------------------------------------------------------
def test_gta5_flat_layout_palette_indices(tmp_path):
    root = tmp_path / "gta5"
    raws = {}
    for n in (1, 2, 22):  # 00001, 00002 in the shipped train list, 00022 in val
        raws[n] = ids(n, CS_IDS)
        save_rgb_png(root / "images" / f"{n:05d}.png", rgb(n))
        save_palette_png(root / "labels" / f"{n:05d}.png", raws[n])
    src = get_source("gta5", str(root), split="all")
    assert [it.key for it in src] == ["00001", "00002", "00022"]
    _check_pair(src, src.items[2], rgb(22), raws[22], CITYSCAPES_ID_TO_TRAIN)
    train = get_source("gta5", str(root), split="train")
    assert [it.key for it in train] == ["00001", "00002"] and train.split == "train"
    assert "not in" in train.warnings[0]
    val = get_source("gta5", str(root), split="val")
    assert [it.key for it in val] == ["00022"]
    lst = tmp_path / "mine.txt"
    lst.write_text("00002.png\n\n00022.png\n")
    mine = get_source("gta5", str(root), split=str(lst))
    assert [it.key for it in mine] == ["00002", "00022"] and mine.split == "mine"


def test_gta5_robustnet_layout(tmp_path):
    root = tmp_path / "gta5"
    for n, part in ((1, "train"), (2, "train"), (3, "valid"), (4, "test")):
        raw = ids(n, CS_IDS)
        save_rgb_png(root / "images" / part / "01_images" / f"{n:05d}.png", rgb(n))
        save_palette_png(root / "labels" / part / "01_images" / f"{n:05d}.png", raw)
    assert [it.key for it in get_source("gta5", str(root), split="train")] == ["00001", "00002"]
    assert [it.key for it in get_source("gta5", str(root), split="val")] == ["00003"]
    src = get_source("gta5", str(root), split="all")
    assert len(src) == 4
    _check_pair(src, src.items[3], rgb(4), ids(4, CS_IDS), CITYSCAPES_ID_TO_TRAIN)


def test_gta5_missing_label_and_errors(tmp_path):
    root = tmp_path / "gta5"
    save_rgb_png(root / "images" / "00001.png", rgb(1))
    save_rgb_png(root / "images" / "00002.png", rgb(2))
    (root / "labels").mkdir()
    save_palette_png(root / "labels" / "00001.png", ids(1, CS_IDS))
    src = get_source("gta5", str(root))
    assert len(src) == 1 and src.skipped[0]["key"] == "00002"
    save_rgb_png(tmp_path / "only_images" / "images" / "00001.png", rgb(1))
    with pytest.raises(LayoutError, match=r"Missing folder: .*only_images/labels"):
        get_source("gta5", str(tmp_path / "only_images"))
    with pytest.raises(LayoutError, match=r"Missing folder: .*images/images"):
        get_source("gta5", str(root / "images"))
    with pytest.raises(LayoutError, match="does not exist"):
        get_source("gta5", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither one of"):
        get_source("gta5", str(root), split="training")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_source("kitti", str(root))


def test_size_mismatch_and_unknown_ids_are_reported(tmp_path):
    root = tmp_path / "gta5"
    save_rgb_png(root / "images" / "00001.png", rgb(1))
    save_palette_png(root / "labels" / "00001.png", ids(1, CS_IDS, h=10))
    save_rgb_png(root / "images" / "00002.png", rgb(2))
    raw = ids(2, CS_IDS)
    raw[0, 0] = 40  # not a Cityscapes labelId
    save_palette_png(root / "labels" / "00002.png", raw)
    src = get_source("gta5", str(root))
    with pytest.raises(SampleError, match="size mismatch"):
        src.decode(src.items[0])
    d = src.decode(src.items[1])
    assert d.unknown_ids == [40] and d.label[0, 0] == 255


def test_colour_label_is_refused(tmp_path):
    root = tmp_path / "gta5"
    save_rgb_png(root / "images" / "00001.png", rgb(1))
    save_rgb_png(root / "labels" / "00001.png", rgb(5))
    src = get_source("gta5", str(root))
    with pytest.raises(SampleError, match="mode RGB"):
        src.decode(src.items[0])


@pytest.fixture
def cityscapes_root(tmp_path):
    return write_cityscapes(tmp_path)


# ---- Cityscapes --------------------------------------------------------------------------------
def test_cityscapes_official(cityscapes_root):
    src = get_source("cityscapes", str(cityscapes_root), split="val")
    assert [it.key for it in src] == ["frankfurt_000000_000001", "frankfurt_000000_000002",
                                      "lindau_000000_000007"]
    _check_pair(src, src.items[2], rgb(2), ids(2, CS_IDS), CITYSCAPES_ID_TO_TRAIN)
    with pytest.raises(LayoutError, match="leftImg8bit/train"):
        get_source("cityscapes", str(cityscapes_root), split="train")


def test_cityscapes_robustnet_layout(tmp_path):
    root = tmp_path / "cs"
    stem = "munster_000000_000019"
    save_rgb_png(root / "leftImg8bit_trainvaltest" / "leftImg8bit" / "val" / "munster"
                 / f"{stem}_leftImg8bit.png", rgb(9))
    save_gray_png(root / "gtFine_trainvaltest" / "gtFine" / "val" / "munster"
                  / f"{stem}_gtFine_labelIds.png", ids(9, CS_IDS))
    src = get_source("cityscapes", str(root), split="val")
    assert [it.key for it in src] == [stem]
    _check_pair(src, src.items[0], rgb(9), ids(9, CS_IDS), CITYSCAPES_ID_TO_TRAIN)


# ---- BDD100K -----------------------------------------------------------------------------------
BDD_IDS = [0, 1, 2, 8, 10, 13, 18, 255]


def test_bdd100k_old_release(tmp_path):
    root = tmp_path / "bdd"
    for n, name in enumerate(["7d06fefd-f7be05a6", "a00d3a5f-fb1e4bd9"]):
        save_jpg(root / "seg" / "images" / "val" / f"{name}.jpg", rgb(n))
        save_gray_png(root / "seg" / "labels" / "val" / f"{name}_train_id.png", ids(n, BDD_IDS))
    save_gray_png(root / "seg" / "labels" / "val" / "orphan_train_id.png", ids(5, BDD_IDS))
    src = get_source("bdd100k", str(root), split="val")
    assert [it.key for it in src] == ["7d06fefd-f7be05a6", "a00d3a5f-fb1e4bd9"]
    assert src.skipped[0]["key"] == "orphan" and "no image" in src.skipped[0]["reason"]
    img, lab = src.load_pair(src.items[1])
    np.testing.assert_array_equal(lab, ids(1, BDD_IDS))
    with Image.open(src.items[1].image_path) as im:  # JPEG: same picture as PIL decodes it
        assert np.abs(img.astype(int) - np.array(im.convert("RGB"))).mean() < 2
    assert len(get_source("bdd100k", str(root / "seg"), split="val")) == 2  # root = seg/


def test_bdd100k_new_release(tmp_path):
    root = tmp_path / "bdd"
    for n, name in enumerate(["b1c66a42-6f7d68ca", "b1c81faa-3df17267", "c0000000-nomask"]):
        save_jpg(root / "images" / "10k" / "train" / f"{name}.jpg", rgb(n))
        if n < 2:
            save_gray_png(root / "labels" / "sem_seg" / "masks" / "train" / f"{name}.png",
                          ids(n, BDD_IDS))
    src = get_source("bdd100k", str(root), split="train")
    assert [it.key for it in src] == ["b1c66a42-6f7d68ca", "b1c81faa-3df17267"]
    assert not src.skipped
    np.testing.assert_array_equal(src.load_pair(src.items[0])[1], ids(0, BDD_IDS))
    with pytest.raises(LayoutError, match="new release"):
        get_source("bdd100k", str(root), split="val")


# ---- Mapillary ---------------------------------------------------------------------------------
MAP_IDS = [2, 7, 13, 15, 17, 27, 30, 44, 46, 55, 65]


def test_mapillary_v12_and_label_maps(tmp_path):
    root = tmp_path / "mapillary"
    for n, name in enumerate(["--0I-tY1Hd1rT3qe2Gk_qg", "_1Gn_xkw7sa_i9GU4mkxxQ"]):
        save_jpg(root / "validation" / "images" / f"{name}.jpg", rgb(n))
        save_palette_png(root / "validation" / "labels" / f"{name}.png", ids(n, MAP_IDS),
                         palette=np.random.default_rng(0).integers(0, 256, (66, 3)))
    src = get_source("mapillary", str(root), split="val")
    assert src.label_map_name == "mapillary_robustnet" and len(src) == 2
    _check_pair(src, src.items[0], rgb(0), ids(0, MAP_IDS), MAPILLARY_ROBUSTNET.lut)
    alt = get_source("mapillary", str(root), split="val", label_map="openseg")
    assert alt.label_map_name == "mapillary_openseg"
    lab = alt.load_pair(alt.items[0])[1]
    np.testing.assert_array_equal(lab, MAPILLARY_OPENSEG.lut[ids(0, MAP_IDS)])
    assert (lab != src.load_pair(src.items[0])[1]).any()  # ids 7, 44, 46 differ
    with pytest.raises(ValueError, match="openseg"):
        get_source("mapillary", str(root), label_map="cityscapes")


def test_mapillary_v12_v20_layout(tmp_path):
    root = tmp_path / "mapillary"
    save_jpg(root / "training" / "images" / "abc.jpg", rgb(3))
    save_palette_png(root / "training" / "v1.2" / "labels" / "abc.png", ids(3, MAP_IDS))
    save_palette_png(root / "training" / "v2.0" / "labels" / "abc.png", ids(4, [99, 120]))
    src = get_source("mapillary", str(root), split="train")
    np.testing.assert_array_equal(src.load_pair(src.items[0])[1],
                                  MAPILLARY_ROBUSTNET.lut[ids(3, MAP_IDS)])
    with pytest.raises(LayoutError, match="validation"):
        get_source("mapillary", str(root), split="val")


# ---- SYNTHIA -----------------------------------------------------------------------------------
SYN_IDS = [0, 1, 2, 3, 4, 8, 10, 15, 21, 22]


def test_synthia_16bit_labels(tmp_path):
    root = tmp_path / "RAND_CITYSCAPES"
    for stem in ("0000000", "0000001", "0000003"):  # 0 and 3 in the val list, 1 in train
        n = int(stem)
        save_rgb_png(root / "RGB" / f"{stem}.png", rgb(n))
        inst = np.random.default_rng(n).integers(256, 5000, (12, 20))  # > 8 bits
        save_synthia_label(root / "GT" / "LABELS" / f"{stem}.png", ids(n, SYN_IDS), inst)
    raw_file = cv2.imread(str(root / "GT" / "LABELS" / "0000003.png"), cv2.IMREAD_UNCHANGED)
    assert raw_file.dtype == np.uint16 and raw_file.max() > 255  # really a 16-bit file
    with Image.open(root / "GT" / "LABELS" / "0000003.png") as im:  # the PIL trap
        pil = np.array(im.convert("RGB"))[..., 0]
    assert not np.array_equal(pil, ids(3, SYN_IDS))
    val = get_source("synthia", str(tmp_path), split="val")  # root above RAND_CITYSCAPES
    assert [it.key for it in val] == ["0000000", "0000003"]
    _check_pair(val, val.items[1], rgb(3), ids(3, SYN_IDS), SYNTHIA_ID_TO_TRAIN)
    train = get_source("synthia", str(root), split="train")
    assert [it.key for it in train] == ["0000001"]
    assert len(get_source("synthia", str(root), split="all")) == 3


def test_synthia_out_of_table_id_is_not_truncated(tmp_path):
    root = tmp_path / "syn"
    save_rgb_png(root / "RGB" / "0000001.png", rgb(1))
    cls = ids(1, SYN_IDS).astype(np.uint16)
    cls[0, 0] = 259  # 259 & 0xFF == 3 (road) if truncated
    save_synthia_label(root / "GT" / "LABELS" / "0000001.png", cls, np.zeros_like(cls))
    src = get_source("synthia", str(root), split="all")
    d = src.decode(src.items[0])
    assert d.unknown_ids == [259] and d.label[0, 0] == 255
    with pytest.raises(LayoutError, match="RGB"):
        get_source("synthia", str(tmp_path))


def test_shard_of_a_target_without_split_takes_val_and_says_so(tmp_path, capsys):
    import json

    from blindseg_dist.cli import main

    root = tmp_path / "RAND_CITYSCAPES"
    for stem in ("0000000", "0000001", "0000003"):  # 0 and 3 in the val list, 1 in train
        save_rgb_png(root / "RGB" / f"{stem}.png", rgb(int(stem)))
        save_synthia_label(root / "GT" / "LABELS" / f"{stem}.png", ids(int(stem), SYN_IDS),
                           np.zeros((12, 20), np.uint16))
    assert main(["shard", "synthia", str(root), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "no --split given" in out and "evaluation split 'val'" in out
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["split"] == "val" and sorted(s["key"] for s in m["samples"]) == ["0000000", "0000003"]
    assert main(["shard", "synthia", str(root), "--out", str(tmp_path / "t"), "--split", "train"]) == 0
    assert "no --split" not in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["split"] == "train"
