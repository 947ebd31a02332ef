"""`blindseg predict`: masks and overlays at the input size for images of any size, clear errors."""

import numpy as np
import pytest
from PIL import Image

from blindseg_dist.cli import main
from blindseg_dist.data.labels import PALETTE, colorize
from blindseg_dist.tools.predict import predict_folder
from tests.engine._eval_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"))


def test_predict_writes_masks_of_the_input_size(tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    a = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 90, 3), dtype=np.uint8)
    Image.fromarray(a).save(imgs / "a.png")
    Image.fromarray(b).save(imgs / "sub" / "b.JPG", quality=95)
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = predict_folder(checkpoint, imgs, out, alpha=0.4, progress=False)
    assert summary["images"] == 2
    for rel, src in (("a.png", a), ("sub/b.png", b)):
        mask = np.asarray(Image.open(out / "masks" / rel))
        labels = np.asarray(Image.open(out / "labels" / rel))
        over = np.asarray(Image.open(out / "overlays" / rel))
        assert mask.shape == src.shape and over.shape == src.shape and labels.shape == src.shape[:2]
        assert labels.max() < 19 and np.array_equal(mask, colorize(labels))
        assert {tuple(c) for c in mask.reshape(-1, 3)} <= {tuple(c) for c in PALETTE}
    # the overlay is the alpha blend of the image and the mask
    mask = np.asarray(Image.open(out / "masks" / "a.png")).astype(float)
    over = np.asarray(Image.open(out / "overlays" / "a.png")).astype(float)
    assert np.abs(over - (0.6 * a + 0.4 * mask)).max() <= 1


def test_predict_errors_name_the_folder(tmp_path, checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    for folder, what in ((tmp_path / "empty", "holds no"), (tmp_path / "missing", "does not exist")):
        rc = main(["predict", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and str(folder) in err
    assert not (tmp_path / "o").exists()


def test_predict_keeps_same_named_images_apart_skips_bad_ones_and_ignores_its_output(tmp_path, checkpoint, capsys):
    rng = np.random.default_rng(1)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    b = np.zeros((40, 48, 3), dtype=np.uint8)  # a different image of the same stem
    Image.fromarray(a).save(imgs / "x.png")
    Image.fromarray(b).save(imgs / "x.jpg", quality=95)
    Image.fromarray(a[:1, :1]).save(imgs / "tiny.png")  # 1x1
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = imgs / "pred"  # --out inside --images
    rc = main(["predict", "--checkpoint", str(checkpoint), "--images", str(imgs), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err  # images were skipped: the end says so
    assert f"skipped {imgs / 'tiny.png'}: 1x1 px" in err and f"skipped {imgs / 'broken.jpg'}: cannot read it" in err
    assert "2 of 4 image(s) skipped" in err
    labels = sorted(p.name for p in (out / "labels").iterdir())
    assert labels == ["x.jpg.png", "x.png.png"]  # two output sets, none overwritten
    over_png = np.asarray(Image.open(out / "overlays" / "x.png.png")).astype(float)
    mask_png = np.asarray(Image.open(out / "masks" / "x.png.png")).astype(float)
    assert np.abs(over_png - (0.5 * a + 0.5 * mask_png)).max() <= 1  # x.png's overlay is of x.png
    # a second run reads only the 4 inputs again, not the outputs now under imgs/pred
    summary = predict_folder(checkpoint, imgs, out, progress=False)
    assert summary["images"] == 2 and len(summary["skipped"]) == 2
    assert sorted(p.name for p in (out / "labels").iterdir()) == labels
