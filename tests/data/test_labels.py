import numpy as np
import pytest

from blindseg_dist.data import labels as L


def test_class_table_constants():
    assert L.NUM_CLASSES == 19 and L.IGNORE == 255 and len(L.CLASS_NAMES) == 19
    assert L.PALETTE.shape == (19, 3) and L.PALETTE.dtype == np.uint8
    assert tuple(L.PALETTE[0]) == (128, 64, 128) and tuple(L.PALETTE[18]) == (119, 11, 32)
    assert L.CLASS_NAMES[10] == "sky" and L.CLASS_NAMES[13] == "car"


def test_cityscapes_lut_cross_check():
    lut = L.CITYSCAPES_ID_TO_TRAIN
    assert lut.shape == (256,) and lut.dtype == np.uint8
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for raw in range(256):
        assert lut[raw] == expected.get(raw, 255), raw
    # The colour trap: polegroup (18) shares pole's colour but is ignored.
    assert tuple(L.CITYSCAPES_ID_COLOURS[18]) == tuple(L.CITYSCAPES_ID_COLOURS[17])
    assert lut[17] == 5 and lut[18] == 255


def test_synthia_table_is_16bit_aware():
    assert L.SYNTHIA_ID_TO_TRAIN.shape == (65536,)
    raw = np.array([[1, 3, 8, 21], [15, 0, 22, 300 + 3]], np.uint16)
    out, unknown = L.map_labels(raw, L.SYNTHIA)
    np.testing.assert_array_equal(out, [[10, 0, 13, 3], [6, 255, 255, 255]])
    assert unknown == [303]  # 303 & 0xFF == 47, also unknown, but must not read as 3 (road)


def test_mapillary_maps():
    r, o = L.MAPILLARY_ROBUSTNET.lut, L.MAPILLARY_OPENSEG.lut
    assert (r[13], r[24], r[41], r[2], r[15], r[47], r[50], r[55], r[58], r[52]) == \
        (0, 0, 0, 1, 1, 5, 7, 13, 16, 18)
    assert r[7] == 255 and o[7] == 0 and r[46] == 255 and o[46] == 7 and o[44] == 5
    assert int((r[:66] != 255).sum()) == 25
    _, unknown = L.map_labels(np.array([[65, 66]], np.uint8), L.MAPILLARY_ROBUSTNET)
    assert unknown == [66]


def test_bdd_out_of_table():
    raw = np.array([[0, 18, 255, 19, 200]], np.uint8)
    out, unknown = L.map_labels(raw, L.BDD100K)
    np.testing.assert_array_equal(out, [[0, 18, 255, 255, 255]])
    assert unknown == [19, 200]


def test_map_labels_plain_lut_and_errors():
    out, unknown = L.map_labels(np.array([[7, 26]], np.uint8), L.CITYSCAPES_ID_TO_TRAIN)
    np.testing.assert_array_equal(out, [[0, 13]])
    assert unknown == []
    with pytest.raises(TypeError):
        L.map_labels(np.zeros((2, 2), np.float32), L.CITYSCAPES)


def test_colorize_and_palette_png(tmp_path):
    lab = np.array([[0, 10], [255, 13]], np.uint8)
    col = L.colorize(lab)
    assert col.shape == (2, 2, 3)
    assert tuple(col[0, 1]) == (70, 130, 180) and tuple(col[1, 0]) == (0, 0, 0)
    from PIL import Image

    ids = L.train_to_cityscapes_ids(lab)
    np.testing.assert_array_equal(ids, [[7, 23], [0, 26]])
    L.cityscapes_palette_png(ids, tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), ids)
        assert tuple(im.convert("RGB").getpixel((1, 1))) == (0, 0, 142)
