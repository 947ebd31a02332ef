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
