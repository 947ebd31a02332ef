"""Plain ViT backbones (model/vit.py): pyramid shapes at any size and patch size, the token column
against timm's own forward, BlindNet's IN points and losses, local weights, FLOPs, checkpointing."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from blindseg_dist.config import LossConfig
from blindseg_dist.model import build_backbone, build_model
from blindseg_dist.model.objective import BlindNetObjective
from blindseg_dist.model.vit import ViTBackbone, is_vit
from blindseg_dist.tools.flops import count_gflops

TINY = dict(depth=4, embed_dim=32, num_heads=2)
VIT_OPTS = dict(pyramid_channels=16)
FAMILIES = ["vit_small_patch16_224", "vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224"]


def _tiny(name: str, output_stride: int = 16, **vit) -> ViTBackbone:
    torch.manual_seed(0)
    return build_backbone(f"timm:{name}", output_stride=output_stride, timm_kwargs=TINY, vit={**VIT_OPTS, **vit})


def _assert_instance_normalized(t: torch.Tensor) -> None:
    flat = t.detach().float().flatten(2)
    assert flat.mean(-1).abs().max() < 1e-4
    assert (flat.var(-1, unbiased=False) - 1).abs().max() < 1e-2


def test_vit_names_route_to_the_vit_backbone() -> None:
    for name in ("vit_large_patch14_dinov2", "vit_large_patch14_reg4_dinov2", "eva02_large_patch14_224",
                 "vit_base_patch16_clip_224", "deit_small_patch16_224"):
        assert is_vit(name), name
    assert not is_vit("convnext_tiny") and not is_vit("swin_tiny_patch4_window7_224") and not is_vit("nope")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("output_stride", [16, 32])
def test_pyramid_shapes_any_size_and_gradients(name: str, output_stride: int) -> None:
    b = build_backbone(f"timm:{name}", output_stride=output_stride, timm_kwargs=TINY, vit=VIT_OPTS).train()
    assert isinstance(b, ViTBackbone) and b.output_stride == output_stride
    for h, w in ((50, 70), (64, 33)):  # not multiples of 14 or 16: padded, position embeddings resampled
        feats, in_feats = b(torch.randn(2, 3, h, w))
        strides = (4, 8, 16, output_stride)
        assert [tuple(f.shape) for f in feats] == [(2, 16, -(-h // s), -(-w // s)) for s in strides]
        grid = (-(-h // b.patch), -(-w // b.patch))
        assert tuple(in_feats[0].shape) == (2, 32, *grid)  # embed: the patch grid
        assert tuple(in_feats[1].shape) == tuple(feats[0].shape) and tuple(in_feats[2].shape) == tuple(feats[1].shape)
        for t in in_feats:
            _assert_instance_normalized(t)
    sum(f.square().mean() for f in feats + in_feats).backward()
    unused = [n for n, p in b.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient (DDP would need find_unused_parameters): {unused}"


@pytest.mark.parametrize("name", FAMILIES)
def test_token_column_equals_timm_forward_intermediates(name: str) -> None:
    """With no IN in the column, the tapped maps are timm's own normalized intermediates: the same
    padding, the same resampled position embeddings (and EVA rotary embeddings)."""
    b = _tiny(name, in_points=("p4", "p8", "p16"), blocks=(0, 1, 2, 3)).eval()
    ref = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True, **TINY)
    ref_state = {k: v for k, v in b.vit.state_dict().items()}
    ref_state.update({f"{'norm' if name.startswith('vit') else 'fc_norm'}.{k}": v for k, v in b.tap_norm.state_dict().items()})
    ref.load_state_dict(ref_state, strict=False)
    if not name.startswith("vit"):  # EVA-02: LayerNorm in fc_norm; apply it like forward_intermediates(norm=True)
        ref.norm = ref.fc_norm
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        maps, recorded = b.column(x)
        want = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, output_fmt="NCHW", intermediates_only=True)
    assert not recorded
    for got, exp in zip(maps, want):
        torch.testing.assert_close(got, exp)


def test_in_points_are_configurable() -> None:
    b = _tiny("vit_small_patch16_224", 32, in_points=("block1", "p16", "p32"), blocks=(1, 2, 3, 3)).train()
    b2 = _tiny("vit_small_patch16_224", 32, in_points=("embed", "p4", "p8"), blocks=(1, 2, 3, 3)).train()
    x = torch.randn(1, 3, 64, 64)
    feats, in_feats = b(x)
    assert [t.shape[1] for t in in_feats] == [32, 16, 16] and b.in_channels == (32, 16, 16)
    assert tuple(in_feats[0].shape[-2:]) == (4, 4) and tuple(in_feats[1].shape[-2:]) == (4, 4)
    assert tuple(in_feats[2].shape[-2:]) == (2, 2)
    for t in in_feats:
        _assert_instance_normalized(t)
    assert all(type(m) is nn.InstanceNorm2d and not m.affine for m in b.modules() if isinstance(m, nn.InstanceNorm2d))
    assert len([m for m in b.modules() if isinstance(m, nn.InstanceNorm2d)]) == 3
    # the IN after block 1 feeds block 2: the column differs from the default placement's
    b2.load_state_dict(b.state_dict())
    assert not torch.allclose(b2(x)[0][3], feats[3])
    with pytest.raises(ValueError, match="vit_in_points"):
        _tiny("vit_small_patch16_224", in_points=("embed", "block9", "p4"))
    with pytest.raises(ValueError, match="vit_blocks"):
        _tiny("vit_small_patch16_224", blocks=(3, 2, 1, 0))


def test_all_four_losses_run_and_reach_the_vit() -> None:
    torch.manual_seed(0)
    net = build_model("timm:vit_small_patch14_reg4_dinov2", num_classes=5, timm_kwargs=TINY, vit=VIT_OPTS).train()
    obj = BlindNetObjective(net, LossConfig(), run_seed=0)
    g = torch.Generator().manual_seed(0)
    x, xa = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    cells = torch.randint(0, 5, (2, 5, 5), generator=g)
    label = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :64, :64].contiguous()
    out = obj(x, label, xa)
    assert set(out["terms"]) == {"ce", "aux", "ce_aug", "cml", "ccl", "cwcl", "sdcl"}
    embed_w = net.backbone.vit.patch_embed.proj.weight
    for term in ("cml", "ccl", "cwcl", "sdcl"):
        value = out["terms"][term]
        assert torch.isfinite(value) and value.item() > 0, term
        (grad,) = torch.autograd.grad(value, embed_w, retain_graph=True, allow_unused=True)
        assert grad is not None and grad.abs().sum() > 0, f"{term} does not reach the patch embedding"
    out["total"].backward()
    assert all(p.grad is not None for p in net.backbone.parameters())


def test_baseline_vit_builds_only_the_levels_it_reads() -> None:
    """Without CML/CCL (the baseline) nothing reads the stride-8 level: it is not built, so every
    parameter gets a gradient from CE + aux (DDP needs no find_unused_parameters)."""
    from blindseg_dist.config import load_config, model_kwargs

    cfg = load_config(None, ["model.backbone=timm:vit_small_patch16_224", "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
                             "model.vit_pyramid_channels=16", "loss.two_view=false", "loss.cml=0", "loss.ccl=0",
                             "loss.cwcl=0", "loss.sdcl=0"])
    net = build_model(**model_kwargs(cfg)).train()
    assert net.backbone.built == (True, False, True, True) and net.proj_heads is None
    out = net(torch.randn(2, 3, 32, 32))
    (out["logits"].square().mean() + out["aux"].square().mean()).backward()
    assert all(p.grad is not None for p in net.parameters())
    full = build_model(**model_kwargs(load_config(None, ["model.backbone=timm:vit_small_patch16_224",
                                                         "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"])))
    assert full.backbone.built == (True, True, True, True)


def test_grad_checkpointing_per_block_same_gradients() -> None:
    plain = _tiny("eva02_tiny_patch14_224").train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    calls = []
    for blk in ckpt.vit.blocks:
        blk.register_forward_pre_hook(lambda *a: calls.append(1))  # (post hooks: early stop)
    x = torch.randn(2, 3, 42, 56)
    for b in (plain, ckpt):
        feats, in_feats = b(x)
        (feats[3].square().mean() + sum(t.square().mean() for t in in_feats)).backward()
    assert len(calls) == 2 * ckpt.depth  # every block recomputed once in backward
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("suffix, prefix", [(".safetensors", ""), (".pth", "module.")])
def test_weights_from_a_local_file(tmp_path: Path, suffix: str, prefix: str) -> None:
    """A timm state dict at another grid size (DINOv2's 518 px: 37x37 position embeddings) loads with
    its position embeddings resampled; the report names missing and unexpected keys."""
    torch.manual_seed(1)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=98, **TINY)
    state = {f"{prefix}{k}": v.clone().normal_() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    del state[f"{prefix}blocks.3.mlp.fc2.bias"]
    state[f"{prefix}extra.weight"] = torch.zeros(3)
    path = tmp_path / f"dinov2{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    b = build_backbone("timm:vit_small_patch14_dinov2", timm_kwargs=TINY, vit=VIT_OPTS, pretrained=path)
    report = b.pretrained_report
    assert report["missing"] == ["blocks.3.mlp.fc2.bias"] and report["unexpected"] == ["extra.weight"]
    assert report["loaded"] == len(src.state_dict()) - 1
    torch.testing.assert_close(b.vit.blocks[2].attn.qkv.weight, state[f"{prefix}blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(b.tap_norm.weight, state[f"{prefix}norm.weight"])
    assert b.vit.pos_embed.shape == (1, 1 + 37 * 37, 32)  # class token + grid resampled from 7x7 to 37x37
    with pytest.raises(ValueError, match="no key matches"):
        torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
        build_backbone("timm:vit_small_patch14_dinov2", timm_kwargs=TINY, pretrained=tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        build_backbone("timm:vit_small_patch14_dinov2", timm_kwargs=TINY, pretrained=tmp_path / "missing.pth")


def test_fvcore_counts_the_attention() -> None:
    from blindseg_dist.tools.flops import sdpa_flop_jit

    class Attn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.reshape(2, 3, 50, 8)  # (B, heads, N, d)
            return torch.nn.functional.scaled_dot_product_attention(q, q[:, :, :40], q[:, :, :40, :6])

    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(Attn(), torch.zeros(2, 3, 50, 8))
    fca.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    assert fca.total() == 2 * 3 * 50 * 40 * (8 + 6)  # q k^T + attn v multiply-adds
    net = build_model("timm:vit_small_patch16_224", timm_kwargs=TINY, vit=VIT_OPTS, aux=False, proj_heads=False)
    small, large = count_gflops(net, (64, 64)), count_gflops(net, (128, 128))
    assert small > 0 and 3.5 < large / small < 4.6  # ~4x the pixels; attention grows as N^2


def test_meta_device_count_is_close_to_fvcore_and_zero_bytes() -> None:
    from blindseg_dist.tools.flops import meta_gmacs, zero_memory_bytes

    kw = dict(backbone="timm:vit_small_patch14_dinov2", timm_kwargs=TINY, vit=VIT_OPTS, aux=False, proj_heads=False)
    fv = count_gflops(build_model(**kw), (56, 84))
    meta = meta_gmacs(kw, (56, 84))
    assert 0.9 * fv < meta < 1.1 * fv  # the counters differ on norms, resizes, transposed convs
    b = zero_memory_bytes(1000, 200, world=4, optimizer="adamw", precision="bf16")
    assert b == {"stage0": 2 * 1200 + 2 * 1000 + 12 * 1000, "stage1": 2 * 1200 + 2 * 1000 + 12 * 1000 / 4,
                 "stage2": 2 * 1200 + 14 * 1000 / 4, "stage3": (2 * 1200 + 14 * 1000) / 4}
    assert zero_memory_bytes(10, world=2, optimizer="sgd", precision="no")["stage0"] == 4 * 10 + 4 * 10 + 4 * 10


def test_patch_embedding_gradient_of_a_split_batch_is_the_batch_gradient() -> None:
    """With the IN point "embed" right after the patch embedding, the gradients of sub-batches of
    2, 1 and 1 samples add up to the gradient of the batch of 4 (each rank of a 2+1+1 split sees
    one sub-batch): the IN's gradient for a batch of one is right although it reaches the IN in
    the NHWC layout of the token column."""
    torch.manual_seed(0)
    b = build_backbone("timm:vit_small_patch14_dinov2", timm_kwargs=dict(TINY, depth=2, img_size=56),
                       vit=VIT_OPTS).double().train()
    assert b.in_points[0] == "embed"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 56, 56, generator=g, dtype=torch.float64)
    probes = [torch.randn(4, 16, 14, 14, generator=g, dtype=torch.float64),
              torch.randn(4, 16, 4, 4, generator=g, dtype=torch.float64)]

    def grads(lo: int, hi: int) -> dict[str, torch.Tensor]:
        b.zero_grad(set_to_none=True)
        feats, _ = b(x[lo:hi])
        sum((f * p[lo:hi]).sum() for f, p in zip((feats[0], feats[3]), probes)).backward()
        return {n: p.grad.clone() for n, p in b.named_parameters() if p.grad is not None}

    full = grads(0, 4)
    parts = [grads(lo, hi) for lo, hi in ((0, 2), (2, 3), (3, 4))]
    assert "vit.patch_embed.proj.weight" in full
    # atol from the largest gradient: tensors that an IN makes (mathematically) gradient-free, such as
    # the patch embedding's bias, differ only by round-off
    atol = 1e-10 * max(float(v.abs().max()) for v in full.values())
    for n, want in full.items():
        torch.testing.assert_close(sum(p[n] for p in parts), want, rtol=1e-9, atol=atol, msg=n)
