"""TensorBoard: the training image panel (input, augmented view, ground truth, prediction) and the
evaluation results per target and per class, read back from the event files."""
import io

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blindseg_dist.data.labels import colorize
from blindseg_dist.data.views import normalize, to_unit_float
from blindseg_dist.engine.evaluate import log_results, target_result
from blindseg_dist.engine.logging import PANEL_TAG, RunLogger, log_images


def _accumulator(folder):
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_log_images_panel_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    h, w = 24, 32
    raw = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    raw_aug = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    label = torch.from_numpy(rng.integers(0, 19, (2, h, w))).long()
    label[:, :3, :3] = 255
    batch = {"image": torch.stack([normalize(to_unit_float(r)) for r in raw]),
             "image_aug": torch.stack([normalize(to_unit_float(r)) for r in raw_aug]), "label": label}
    logits = torch.zeros(2, 19, h // 4, w // 4)
    logits[:, 13] = 1.0  # "car" everywhere, given at 1/4 resolution (upsampled by log_images)
    logger = RunLogger(tmp_path / "tb", enabled=True)
    log_images(logger, batch, {"logits": logits}, step=7)
    logger.close()

    acc = _accumulator(tmp_path / "tb")
    assert PANEL_TAG in acc.Tags()["images"]
    (ev,) = acc.Images(PANEL_TAG)
    assert ev.step == 7
    panel = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
    assert panel.shape == (2 * h + 2, 4 * w + 3 * 2, 3)  # 2 rows x 4 columns, 2-px separators
    col = lambda k: slice(k * (w + 2), k * (w + 2) + w)
    for i in range(2):
        rows = slice(i * (h + 2), i * (h + 2) + h)
        assert np.abs(panel[rows, col(0)].astype(int) - raw[i]).max() <= 1  # de-normalized input
        assert np.abs(panel[rows, col(1)].astype(int) - raw_aug[i]).max() <= 1  # augmented view
        assert np.array_equal(panel[rows, col(2)], colorize(label[i].numpy()))  # ground truth colours
        assert (panel[rows, col(3)] == np.array([0, 0, 142], np.uint8)).all()  # prediction: car colour


def test_log_images_without_augmented_view_and_on_other_ranks(tmp_path):
    batch = {"image": torch.zeros(1, 3, 8, 8), "label": torch.zeros(1, 8, 8, dtype=torch.long)}
    logger = RunLogger(tmp_path / "tb", enabled=True)
    log_images(logger, batch, torch.zeros(1, 19, 8, 8), step=1)
    logger.close()
    (ev,) = _accumulator(tmp_path / "tb").Images(PANEL_TAG)
    assert (ev.height, ev.width) == (8, 3 * 8 + 2 * 2)  # input, ground truth, prediction
    log_images(RunLogger(tmp_path / "off", enabled=False), batch, torch.zeros(1, 19, 8, 8), step=1)
    assert not (tmp_path / "off").exists()  # ranks != 0 write nothing


def test_eval_results_per_target_and_class(tmp_path):
    cm = torch.zeros(19, 19, dtype=torch.int64)
    cm[0, 0], cm[0, 1], cm[10, 10] = 6, 2, 4
    results = {"night": target_result(cm), "synthia": target_result(cm, protocol="synthia")}
    logger = RunLogger(tmp_path / "tb", enabled=True)
    log_results(logger, results, step=3)
    logger.close()
    acc = _accumulator(tmp_path / "tb")
    scalars = acc.Tags()["scalars"]
    for tag in ("miou/night", "miou/synthia", "miou16/synthia", "iou/night/road", "iou/night/sky", "iou/night/sidewalk"):
        assert tag in scalars, sorted(scalars)
    assert "miou16/night" not in scalars and "iou/night/car" not in scalars  # never seen: no NaN points
    assert acc.Scalars("iou/night/road")[0].value == np.float32(6 / 8)
    assert acc.Scalars("miou/night")[0].step == 3
    assert "eval/per_class_iou/text_summary" in acc.Tags()["tensors"]
