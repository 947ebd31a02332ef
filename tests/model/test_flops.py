"""tools/flops.py: fvcore counts of the inference network, BlindNet == baseline."""

from __future__ import annotations

import pytest

from blindseg_dist.model.backbones import ResNetBackbone
from blindseg_dist.tools.flops import compute_flops, count_gflops, format_flops_table


def test_compute_flops_resnet50_small(capfd: pytest.CaptureFixture[str]) -> None:
    result = compute_flops({"backbone": "resnet50", "pretrained": "/does/not/matter.pth"}, size=(64, 64))
    assert result["size"] == [64, 64] and "multiply-add" in result["convention"]
    inference = result["model"]["inference"]
    assert inference["params"] == 40_351_539 and inference["gflops"] > 0
    assert result["model"]["training_only"]["params"] == 4_729_875 + 5_023_280  # aux head (3x3 conv with bias) + heads
    assert result["baseline"]["inference"] == inference  # BlindNet adds nothing at inference
    table = format_flops_table(result)
    assert "40.352" in table and "64x64" in table
    captured = capfd.readouterr()
    assert "nsupported" not in captured.out + captured.err  # fvcore kept quiet


def test_resnet50_backbone_gflops_reference() -> None:
    """Plain-stride (OS32) R50 backbone at 512x1024: the reference 42.9 GFLOPs (IN vs BN adds ~0.1)."""
    assert count_gflops(ResNetBackbone("resnet50", output_stride=32), (512, 1024)) == pytest.approx(42.9, rel=0.01)
