"""Backbones: IN placement, output stride, pretrained loading, timm wrappers, checkpointing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from blindseg_dist.model import build_backbone, build_model
from blindseg_dist.model.backbones import ResNetBackbone, TimmBackbone


def _is_blind_in(m: nn.Module) -> bool:
    return (
        type(m) is nn.InstanceNorm2d and not m.affine and not m.track_running_stats and m.eps == 1e-5
    )


def _assert_instance_normalized(t: torch.Tensor) -> None:
    flat = t.float().flatten(2)  # (B, C, H*W)
    assert flat.mean(-1).abs().max() < 1e-4
    assert (flat.var(-1, unbiased=False) - 1).abs().max() < 1e-2


@pytest.mark.parametrize(
    "name, in_channels, channels",
    [("resnet18", (64, 64, 128), (64, 128, 256, 512)), ("resnet50", (64, 256, 512), (256, 512, 1024, 2048))],
)
def test_resnet_in_points(name: str, in_channels: tuple, channels: tuple) -> None:
    b = build_backbone(name).eval()
    assert b.in_channels == in_channels and b.channels == channels and b.output_stride == 16
    assert len(b.in_norms) == 3 and all(_is_blind_in(m) for m in b.in_norms)
    assert [m.num_features for m in b.in_norms] == list(in_channels)
    # The stem BN is replaced, not kept: no module, no parameters, no buffers.
    assert not hasattr(b, "bn1") and not any(k.startswith(("bn1.", "fc.")) for k in b.state_dict())
    with torch.no_grad():
        feats, in_feats = b(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in in_feats] == [
        (2, in_channels[0], 32, 32), (2, in_channels[1], 16, 16), (2, in_channels[2], 8, 8)]
    assert [tuple(t.shape) for t in feats] == [
        (2, channels[0], 16, 16), (2, channels[1], 8, 8), (2, channels[2], 4, 4), (2, channels[3], 4, 4)]
    for t in in_feats:  # pre-ReLU IN outputs
        _assert_instance_normalized(t)
        assert (t < 0).any()
    # layer1 / layer2 outputs are ReLU of the recorded IN outputs.
    torch.testing.assert_close(feats[0], F.relu(in_feats[1]))
    torch.testing.assert_close(feats[1], F.relu(in_feats[2]))


def test_resnet_in_after_residual_add() -> None:
    """IN(last block's bn3 output + its input) is the recorded layer1 feature."""
    b = build_backbone("resnet50").eval()
    seen: dict[str, torch.Tensor] = {}
    last = b.layer1[-1]
    last.conv1.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    last.bn3.register_forward_hook(lambda m, args, out: seen.__setitem__("branch", out))
    with torch.no_grad():
        _, in_feats = b(torch.randn(1, 3, 64, 64))
        expected = F.instance_norm(seen["branch"] + seen["input"], eps=1e-5)
    torch.testing.assert_close(in_feats[1], expected)


@pytest.mark.parametrize("output_stride, dilated", [(16, {"layer4": 2}), (8, {"layer3": 2, "layer4": 4})])
def test_resnet_dilation_matches_the_released_network(output_stride: int, dilated: dict) -> None:
    """The released D16 / D (OS8) variants: every 3x3 conv of every block of a dilated stage, block 0
    included, has that stage's dilation (torchvision's replace_stride_with_dilation keeps the previous
    dilation in block 0: we differ from it on purpose), and no conv of the stage strides. The other
    stages are plain torchvision."""
    ours = ResNetBackbone("resnet50", output_stride)
    plain = resnet50()
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        convs = [(n, m) for n, m in getattr(ours, stage).named_modules() if isinstance(m, nn.Conv2d)]
        if stage not in dilated:
            ref = [(n, m.stride, m.dilation, m.padding) for n, m in getattr(plain, stage).named_modules()
                   if isinstance(m, nn.Conv2d)]
            assert [(n, m.stride, m.dilation, m.padding) for n, m in convs] == ref
            continue
        d = dilated[stage]
        threes = [m for n, m in convs if m.kernel_size == (3, 3)]
        assert len(threes) == len(getattr(ours, stage))  # one conv2 per Bottleneck, block 0 included
        assert all(m.dilation == (d, d) and m.padding == (d, d) for m in threes)
        assert all(m.stride == (1, 1) for _, m in convs)
        ones = [m for n, m in convs if m.kernel_size == (1, 1)]
        assert all(m.dilation == (1, 1) and m.padding == (0, 0) for m in ones)
    with torch.no_grad():
        feats, _ = ours.eval()(torch.randn(1, 3, 64, 64))
    assert feats[3].shape[-1] == feats[2].shape[-1] == 64 // output_stride


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_basicblock_output_stride(output_stride: int) -> None:
    b = build_backbone("resnet18", output_stride=output_stride).eval()
    with torch.no_grad():
        feats, _ = b(torch.randn(1, 3, 64, 64))
    assert feats[3].shape[-1] == 64 // output_stride


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_loading(tmp_path: Path, suffix: str) -> None:
    src = resnet18().state_dict()  # random weights, torchvision names (incl. bn1.*, fc.*)
    for k, v in src.items():
        if v.is_floating_point():
            v.normal_()  # make every tensor differ from a fresh init
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src, str(path))
    else:
        torch.save(src, path)
    model = build_model("resnet18", pretrained=path)
    own = model.backbone.state_dict()
    assert set(own) == {k for k in src if not k.startswith(("bn1.", "fc."))}
    for k, v in own.items():
        torch.testing.assert_close(v, src[k], msg=k)


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", pretrained=tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("timm:resnet18", pretrained=tmp_path / "nope.pth")
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no key matches"):
        build_backbone("resnet18", pretrained=tmp_path / "other.pth")
    torch.save(resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        build_backbone("resnet18", pretrained=tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet42")


@pytest.mark.parametrize(
    "name, output_stride",
    [("resnet18", 16), ("convnext_atto", 32), ("pvt_v2_b0", 32), ("swin_tiny_patch4_window7_224", 32)],
)
def test_timm_backbone(name: str, output_stride: int) -> None:
    b = build_backbone(f"timm:{name}", output_stride=output_stride)
    assert isinstance(b, TimmBackbone)
    channels = tuple(b.body.feature_info.channels())
    assert b.channels == channels and b.in_channels == channels[:3] and b.output_stride == output_stride
    assert all(_is_blind_in(m) or _is_blind_in(m.norm) for m in b.in_norms)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, in_feats = b.eval()(x)
    reductions = b.body.feature_info.reduction()
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // r, 64 // r) for c, r in zip(channels, reductions)]
    for t in in_feats:
        _assert_instance_normalized(t)
    out = build_model(f"timm:{name}", output_stride=output_stride).train()(x)
    assert out["logits"].shape == (2, 19, 64, 64) and out["aux"].shape[1] == 19
    assert [t.shape[1] for t in out["in_feats"]] == list(channels[:3])
    assert [t.shape[1] for t in out["embeds"]] == [256, 256, 256]


def test_timm_output_stride_unsupported() -> None:
    with pytest.raises(ValueError, match="output_stride=32"):
        build_backbone("timm:pvt_v2_b0", output_stride=16)


def test_timm_pretrained_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = timm.create_model("resnet18", pretrained=False).state_dict()
    for v in src.values():
        if v.is_floating_point():
            v.normal_()
    torch.save(src, tmp_path / "timm_r18.pth")
    b = build_backbone("timm:resnet18", pretrained=tmp_path / "timm_r18.pth")
    for k, v in b.body.state_dict().items():
        torch.testing.assert_close(v, src[k], msg=k)


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18"])
def test_grad_checkpointing_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    plain = build_backbone(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    x = torch.randn(2, 3, 64, 64)
    for b in (plain, ckpt):
        feats, in_feats = b(x)
        assert all(t.requires_grad for t in in_feats)
        (feats[3].square().mean() + sum(t[:, :4].square().mean() for t in in_feats)).backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    # The recomputation in backward does not update BN running statistics a second time.
    for (n, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.parametrize("nhwc", [False, True])
def test_in_gradient_of_one_sample_is_its_share_of_the_batch(nhwc: bool) -> None:
    """The gradient an IN layer passes back for a sample does not depend on what else is in the
    batch: samples run one at a time give the rows of the batch gradient, also when the gradient
    reaching the IN output is channels_last (an NHWC consumer: ChannelsLastIN, model.channels_last),
    where torch's instance_norm alone is wrong for a batch of one (a 2+1+1 split over 3 ranks)."""
    from blindseg_dist.model._common import ChannelsLastIN, instance_norm

    norm = ChannelsLastIN(8) if nhwc else instance_norm(8)
    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 6, 8) if nhwc else (3, 8, 5, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if not nhwc:
        w = w.contiguous(memory_format=torch.channels_last)  # the gradient of the output is NHWC

    def grad(lo: int, hi: int) -> torch.Tensor:
        xi = x[lo:hi].clone().requires_grad_()
        norm(xi).backward(w[lo:hi])
        return xi.grad

    xr = x.clone().requires_grad_()  # the IN written out, as the reference
    xc = xr.permute(0, 3, 1, 2) if nhwc else xr
    y = (xc - xc.mean((2, 3), keepdim=True)) * torch.rsqrt(xc.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
    (y.permute(0, 2, 3, 1) if nhwc else y).backward(w)
    torch.testing.assert_close(grad(0, 3), xr.grad)
    torch.testing.assert_close(torch.cat([grad(0, 2), grad(2, 3)]), xr.grad)
    torch.testing.assert_close(torch.cat([grad(i, i + 1) for i in range(3)]), xr.grad)
