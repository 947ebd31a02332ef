"""SegNet / DeepLabV3+: exact parameter counts, eval and train outputs, BN per view, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blindseg_dist.model import SegNet, build_model, count_parameters


@pytest.fixture(scope="module")
def r18() -> SegNet:
    torch.manual_seed(0)
    return build_model("resnet18")


def test_resnet50_parameter_counts() -> None:
    model = build_model("resnet50")
    counts = count_parameters(model)
    # aux: 4,729,363 + the 512 biases of its 3x3 conv (as released); the inference network is unchanged
    assert counts == {"inference": 40_351_539, "aux": 4_729_875, "proj_heads": 5_023_280}
    assert sum(p.numel() for p in model.parameters()) == sum(counts.values())
    assert sum(p.numel() for p in model.decoder.aspp.parameters()) == 15_535_104
    bare = count_parameters(build_model("resnet50", aux=False, proj_heads=False))
    assert bare == {"inference": 40_351_539, "aux": 0, "proj_heads": 0}


def test_conv_bias_convention(r18: SegNet) -> None:
    """Convs that precede a BN have no bias, except the aux head's 3x3 conv (released: it has one);
    classifiers and projection convs have one."""
    aux_conv = r18.aux_head.body[0]
    for module in r18.modules():
        if isinstance(module, nn.Sequential):
            for a, b in zip(module, list(module)[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and a is not aux_conv:
                    assert a.bias is None
    assert r18.decoder.classifier.bias is not None and r18.aux_head.body[-1].bias is not None
    assert aux_conv.kernel_size == (3, 3) and aux_conv.padding == (1, 1) and isinstance(r18.aux_head.body[1], nn.BatchNorm2d)
    assert aux_conv.bias is not None and aux_conv.bias.shape == (512,)
    assert [type(m).__name__ for m in r18.aux_head.body] == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d", "Conv2d"]
    assert all(m.bias is not None for head in r18.proj_heads for m in head.modules() if isinstance(m, nn.Conv2d))
    assert [br[0].dilation for br in r18.decoder.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]


def test_eval_returns_logits_of_input_size(r18: SegNet) -> None:
    r18.eval()
    with torch.no_grad():
        out = r18(torch.randn(1, 3, 64, 96))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 19, 64, 96)


def test_train_outputs(r18: SegNet) -> None:
    r18.train()
    out = r18(torch.randn(2, 3, 64, 64))
    assert set(out) == {"logits", "logits_q", "aux", "in_feats", "embeds", "proj_inputs"}
    assert out["proj_inputs"] is None  # dense embeddings by default
    assert out["logits"].shape == (2, 19, 64, 64) and out["logits_q"].shape == (2, 19, 16, 16)
    assert out["aux"].shape == (2, 19, 4, 4)
    assert [tuple(t.shape) for t in out["in_feats"]] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8)]
    assert [tuple(t.shape) for t in out["embeds"]] == [(2, 256, 4, 4), (2, 256, 16, 16), (2, 256, 16, 16)]
    for e in out["embeds"]:
        torch.testing.assert_close(e.norm(dim=1), torch.ones(e.shape[0], *e.shape[2:]), atol=1e-5, rtol=0)
    # Upsampling is bilinear with align_corners=True.
    torch.testing.assert_close(
        out["logits"], F.interpolate(out["logits_q"], size=(64, 64), mode="bilinear", align_corners=True))
    assert not torch.allclose(
        out["logits"], F.interpolate(out["logits_q"], size=(64, 64), mode="bilinear", align_corners=False))
    sum(t.sum() for t in (out["logits"], out["aux"], *out["embeds"], *out["in_feats"])).backward()
    assert all(p.grad is not None for p in r18.parameters())


def test_training_heads_optional_and_unused_in_eval() -> None:
    model = build_model("resnet18", aux=False, proj_heads=False, output_stride=8).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["aux"] is None and out["embeds"] is None
    assert [br[0].dilation for br in model.decoder.aspp.branches[1:]] == [(12, 12), (24, 24), (36, 36)]
    full = build_model("resnet18").eval()
    called: list[str] = []
    for head in (full.aux_head, *full.proj_heads):
        head.register_forward_hook(lambda m, a, o: called.append(type(m).__name__))
    with torch.no_grad():
        full(torch.randn(1, 3, 64, 64))
    assert called == []


def test_bn_statistics_per_view(r18: SegNet) -> None:
    """Two forwards (one per view) update BN running stats twice, each with that view's own batch."""
    r18.train()
    bn = r18.backbone.layer1[0].bn1
    inputs: list[torch.Tensor] = []
    handle = bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    running = [bn.running_mean.clone()]
    count = int(bn.num_batches_tracked)
    with torch.no_grad():
        for view in (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64) * 3 + 1):
            r18(view)
            running.append(bn.running_mean.clone())
    handle.remove()
    assert int(bn.num_batches_tracked) == count + 2
    for before, after, x in zip(running, running[1:], inputs):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * x.mean(dim=(0, 2, 3)))


def test_channels_last_and_checkpointing_match_default() -> None:
    torch.manual_seed(0)
    ref = build_model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    for kwargs in ({"channels_last": True}, {"grad_checkpointing": True}):
        other = build_model("resnet18", **kwargs)
        other.load_state_dict(ref.state_dict())
        if kwargs.get("channels_last"):
            assert other.decoder.classifier.weight.is_contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(other.eval()(x), ref.eval()(x), atol=1e-4, rtol=1e-4)
        out = other.train()(x)
        out["logits"].mean().backward()
        assert other.backbone.conv1.weight.grad is not None


def test_head_init_is_kaiming_fan_in() -> None:
    """Released initialize_weights on the decoder (ASPP included), aux head and projection heads:
    kaiming_normal_ fan_in with the ReLU gain, std = sqrt(2 / (cin * k * k)); zero biases; BN 1 / 0.
    fan_out would give sqrt(2 / (cout * k * k)): the heads' convs where cin != cout tell them apart."""
    torch.manual_seed(0)
    model = build_model("resnet50")
    heads = {"decoder": model.decoder, "aux": model.aux_head, "proj": model.proj_heads}
    checked = 0
    for name, head in heads.items():
        for n, m in head.named_modules():
            if isinstance(m, nn.Conv2d):
                cin, k = m.in_channels, m.kernel_size[0]
                want, fan_out = (2.0 / (cin * k * k)) ** 0.5, (2.0 / (m.out_channels * k * k)) ** 0.5
                got = float(m.weight.detach().std())
                tol = 4.0 / m.weight.numel() ** 0.5 + 0.01  # sampling error of the std, generous
                assert abs(got / want - 1) < tol, f"{name}.{n}: std {got:.5f}, fan_in wants {want:.5f}"
                if abs(fan_out / want - 1) > 3 * tol:
                    assert abs(got / fan_out - 1) > tol, f"{name}.{n} looks fan_out"
                    checked += 1
                assert abs(float(m.weight.detach().mean())) < 5 * want / m.weight.numel() ** 0.5
                if m.bias is not None:
                    assert float(m.bias.detach().abs().max()) == 0.0
            elif isinstance(m, nn.BatchNorm2d):
                assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())
    assert checked >= 8  # ASPP (2048 -> 256), low_proj, fuse[0], classifier, aux convs, proj heads' second conv
    # the backbone keeps torchvision's init (fan_out), as the released trunk: layer2.0.conv3 is 128 -> 512
    w = model.backbone.layer2[0].conv3.weight.detach()
    assert abs(float(w.std()) / (2.0 / 512) ** 0.5 - 1) < 0.05
