import numpy as np
import pytest
import torch

from blindseg_dist.engine.evaluate import confusion_matrix, iou_from_confusion, target_result


def test_confusion_matrix_counts_and_ignores():
    label = torch.tensor([[0, 0, 1, 255], [2, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 5], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, label, num_classes=19)
    assert cm.dtype == torch.int64 and cm.shape == (19, 19)
    assert cm.sum() == 7  # the ignore pixel is dropped
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 2 and cm[2, 2] == 2 and cm[2, 0] == 1


def test_unknown_label_ids_are_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([1, 2]), torch.tensor([1, 40]))


def test_iou_is_tp_over_tp_fp_fn_and_nanmean():
    cm = np.zeros((19, 19), dtype=np.int64)
    cm[0, 0], cm[0, 1], cm[1, 1], cm[1, 0] = 6, 2, 3, 1  # class 0: TP 6, FN 2, FP 1
    iou, miou = iou_from_confusion(cm)
    assert iou[0] == pytest.approx(6 / 9) and iou[1] == pytest.approx(3 / 6)
    assert np.isnan(iou[2:]).all()  # never seen: NaN, excluded from the mean
    assert miou == pytest.approx((6 / 9 + 3 / 6) / 2)


def test_target_result_json_shape():
    cm = torch.zeros(19, 19, dtype=torch.int64)
    cm[0, 0] = 5
    res = target_result(cm)
    assert res["miou"] == 1.0 and res["per_class_iou"]["road"] == 1.0 and res["per_class_iou"]["sky"] is None
    assert res["confusion_matrix"][0][0] == 5
