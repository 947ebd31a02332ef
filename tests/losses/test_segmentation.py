"""segmentation_loss scopes in a single process (the W-rank contract: test_dist_scopes.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blindseg_dist.losses import segmentation_loss


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    labels[0, :2] = 255
    return logits, labels


@pytest.mark.parametrize("scope", ["reference", "exact"])
def test_single_process_is_the_mean_ce_over_valid_pixels(scope):
    logits, labels = _batch()
    want = F.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, labels, scope=scope), want)


@pytest.mark.parametrize("scope", ["reference", "exact"])
def test_all_ignored_is_a_connected_zero(scope):
    logits, labels = _batch()
    loss = segmentation_loss(logits, torch.full_like(labels, 255), scope=scope)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() == 0


def test_custom_ignore_index_and_bf16_logits():
    logits, labels = _batch(1)
    labels = torch.where(labels == 255, torch.full_like(labels, 250), labels)
    want = F.cross_entropy(logits, labels, ignore_index=250)
    got = segmentation_loss(logits, labels, scope="exact", ignore_index=250)
    torch.testing.assert_close(got, want)
    got16 = segmentation_loss(logits.detach().bfloat16(), labels, ignore_index=250)
    assert got16.dtype == torch.float32


def test_bad_arguments_raise_clear_errors():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="scope"):
        segmentation_loss(logits, labels, scope="global")
    with pytest.raises(ValueError, match="upsample"):
        segmentation_loss(logits, labels[:, :3])
