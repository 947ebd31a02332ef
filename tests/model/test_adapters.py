"""ViT adapters (model/adapters.py): Rein against its formula written out, where it runs, its tokens and
init; LoRA (peft) targets per timm family, block range, SoMA's minor-component SVD init; a frozen
encoder stays frozen and in eval mode."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from blindseg_dist.model import build_model
from blindseg_dist.model.adapters import DEFAULT_LORA_TARGETS, Rein, apply_lora, lora_target_regex

TINY = dict(depth=3, embed_dim=32, num_heads=2)
FAMILIES = {  # timm name -> prefix tokens (class + registers)
    "vit_small_patch14_dinov2": 1,
    "vit_small_patch14_reg4_dinov2": 5,
    "vit_small_patch16_dinov3": 5,
    "eva02_large_patch14_224": 1,
    "vit_small_patch16_224": 1,
}


def _net(arch: str, adapter: str, **opts):
    torch.manual_seed(0)
    return build_model(f"timm:{arch}", timm_kwargs=TINY, aux=False, proj_heads=False,
                       vit=dict(adapter=adapter, pyramid_channels=16, **opts))


def _oracle(rein: Rein, x: torch.Tensor, layer: int, num_prefix: int) -> torch.Tensor:
    """One Rein layer from its formula, plain tensor operations on the layer's weights."""
    a, b = rein.tokens_a[layer], rein.tokens_b[layer]
    t = torch.einsum("tr,rc->tc", a, b)  # [T, C]
    f = x[:, num_prefix:]
    logits = torch.einsum("bnc,tc->bnt", f, t) / math.sqrt(x.shape[-1])
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    attn = e / e.sum(-1, keepdim=True)
    tok = torch.einsum("tc,dc->td", t[1:], rein.mlp_token.weight) + rein.mlp_token.bias  # mlp_token(t[1:])
    delta = torch.einsum("bnt,tc->bnc", attn[..., 1:], tok)
    delta = torch.einsum("bnc,dc->bnd", delta + f, rein.mlp_delta.weight) + rein.mlp_delta.bias
    return torch.cat([x[:, :num_prefix], f + rein.scale * delta], dim=1)


@pytest.mark.parametrize("num_prefix", [1, 5])
def test_rein_layer_matches_its_formula(num_prefix):
    torch.manual_seed(1)
    rein = Rein(4, 24, 16, num_tokens=10, rank=3).double()
    with torch.no_grad():
        rein.scale.fill_(0.7)  # a visible update (init 1e-3 would hide errors in the delta)
    x = torch.randn(2, num_prefix + 13, 24, dtype=torch.float64)
    for layer in (0, 3):
        got = rein(x, layer, num_prefix)
        want = _oracle(rein, x, layer, num_prefix)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert torch.equal(got[:, :num_prefix], x[:, :num_prefix])  # class / register tokens untouched
        assert (got[:, num_prefix:] - x[:, num_prefix:]).abs().max() > 1e-3
    # the null slot: token 0 takes part in the softmax, then its column is dropped (a softmax over
    # tokens 1.. alone, the other reading, gives another result)
    t = rein.tokens(1)
    f = x[:, num_prefix:]
    attn = torch.softmax(f @ t[1:].t() / math.sqrt(24), -1)
    other = f + rein.scale * rein.mlp_delta(attn @ rein.mlp_token(t[1:]) + f)
    assert (rein(x, 1, num_prefix)[:, num_prefix:] - other).abs().max() > 1e-4


def test_rein_tokens_init_and_shared_layers():
    rein = Rein(24, 1024, 16, num_tokens=100, rank=16)
    assert rein.tokens().shape == (24, 100, 1024) and rein.tokens(5).shape == (100, 1024)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + math.sqrt(1024 * 16)))
    assert rein.init_bound == pytest.approx(bound) and 0.08 < bound < 0.083
    for p in (rein.tokens_a, rein.tokens_b):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound  # uniform over the whole range
    assert float(rein.scale.detach()) == pytest.approx(1e-3)
    linears = [m for m in rein.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(m.weight.shape == (1024, 1024) for m in linears)  # shared by all layers
    n = sum(p.numel() for p in rein.parameters())
    assert n == 24 * 100 * 16 + 24 * 16 * 1024 + 2 * (1024 * 1024 + 1024) + 1  # ~2.5M for ViT-L
    full = Rein(2, 8, 14, num_tokens=5, rank=0)
    assert full.tokens().shape == (2, 5, 8)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_rein_runs_after_every_block_on_patch_tokens(arch):
    net = _net(arch, "rein", rein=dict(num_tokens=6, rank=4))
    bb = net.backbone
    assert bb.num_prefix == FAMILIES[arch]
    calls = []
    orig = bb.rein.forward

    def spy(x, layer, num_prefix=0):
        calls.append((layer, num_prefix))
        return orig(x, layer, num_prefix)

    bb.rein.forward = spy
    net.train()(torch.randn(2, 3, 40, 40))
    assert calls == [(i, FAMILIES[arch]) for i in range(bb.depth)]
    assert bb.tokens().shape == (bb.depth, 6, 32)
    trainable = {n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert trainable == {"rein", "tap_norm", "levels"}
    assert not any(p.requires_grad for p in bb.vit.parameters())


EXPECTED_LINEARS = {
    "vit_small_patch14_dinov2": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "vit_small_patch14_reg4_dinov2": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "vit_small_patch16_dinov3": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "eva02_large_patch14_224": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1_g", "mlp.fc1_x",
                                "mlp.fc2"],
    "vit_small_patch16_224": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_lora_targets_each_family_in_the_block_range(arch):
    net = _net(arch, "lora", lora=dict(rank=2, blocks=[1, 2]))
    bb = net.backbone
    linears = {n for n, m in bb.vit.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.0.")}
    assert {n[len("blocks.0."):] for n in linears} == set(EXPECTED_LINEARS[arch])  # what named_modules() says
    want = [f"blocks.{b}.{s}" for b in (1, 2) for s in EXPECTED_LINEARS[arch]]
    assert sorted(bb.lora_targets) == sorted(want)
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad and n.startswith("vit.")]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(n.startswith("vit.blocks.0.") for n in trainable)
    assert len(trainable) == 2 * len(want)
    # peft's default init: B = 0, the network is unchanged at step 0
    assert all(float(p.detach().abs().max()) == 0 for n, p in bb.named_parameters() if ".lora_B." in n)
    out = net.train()(torch.randn(2, 3, 40, 40))
    out["logits"].square().mean().backward()
    assert all(p.grad is not None for n, p in bb.vit.named_parameters() if p.requires_grad)


def test_lora_regex_is_anchored_to_blocks():
    regex = lora_target_regex(range(0, 12))
    assert re.fullmatch(regex, "blocks.3.attn.proj") and re.fullmatch(regex, "blocks.11.mlp.fc2")
    assert not re.fullmatch(regex, "patch_embed.proj") and not re.fullmatch(regex, "blocks.12.attn.proj")
    assert not re.fullmatch(regex, "blocks.3.attn.proj.lora_A")
    assert re.search("proj", "patch_embed.proj")  # what a bare "proj" target would also adapt
    assert re.fullmatch(lora_target_regex([8, 9], DEFAULT_LORA_TARGETS), "blocks.9.attn.qkv")


def test_lora_refuses_targets_that_match_nothing():
    with pytest.raises(ValueError, match=r"matches no linear layer of block\(s\) \[0, 1, 2\].*attn.qkv"):
        _net("vit_small_patch14_dinov2", "lora", lora=dict(rank=2, targets=r"attn\.q_proj"))
    with pytest.raises(ValueError, match="model.lora_blocks"):
        _net("vit_small_patch14_dinov2", "lora", lora=dict(rank=2, blocks=[1, 3]))
    with pytest.raises(ValueError, match="needs a plain ViT"):
        build_model("resnet18", vit=dict(adapter="rein"))


def test_lora_svd_minor_init_keeps_the_function_and_takes_the_smallest_components():
    torch.manual_seed(0)
    import timm

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True, **TINY)
    before = {n: m.weight.detach().clone() for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = vit.eval().forward_features(x)
    names = apply_lora(vit, rank=4, alpha=8.0, blocks=[0, 2], init="svd_minor", train_bias=True)
    with torch.no_grad():
        got = vit.eval().forward_features(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    layer = vit.get_submodule(names[0])
    s = layer.scaling["default"]
    assert s == 2.0
    w = before[names[0]]
    delta = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    sv = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], sv[-4:], rtol=1e-4, atol=1e-5)  # both descending
    torch.testing.assert_close(layer.get_base_layer().weight + delta, w, rtol=1e-5, atol=1e-5)
    assert sorted({n.split(".")[1] for n in names}) == ["0", "2"]
    biases = [n for n, p in vit.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert biases and all(n.endswith("base_layer.bias") for n in biases)


@pytest.mark.parametrize("adapter", ["none", "rein", "lora"])
def test_frozen_encoder_stays_in_eval_mode(adapter):
    opts = dict(drop_path=0.5, rein=dict(num_tokens=4, rank=2)) if adapter == "rein" else dict(drop_path=0.5)
    if adapter == "lora":
        opts["lora"] = dict(rank=2, dropout=0.5)
    torch.manual_seed(0)
    net = build_model("timm:vit_small_patch14_dinov2", timm_kwargs={**TINY, "drop_rate": 0.3}, aux=False,
                      proj_heads=False, freeze_backbone=True, vit=dict(adapter=adapter, pyramid_channels=16, **opts))
    net.train()
    bb = net.backbone
    assert not bb.vit.training and all(not m.training for n, m in bb.vit.named_modules() if ".lora_" not in n)
    assert bb.tap_norm.training and bb.levels[0].training and net.decoder.training
    if adapter == "lora":
        drops = [m for n, m in bb.vit.named_modules() if n.endswith("lora_dropout.default")]
        assert drops and all(m.training for m in drops)  # the adapter's own dropout follows train()
    else:
        x = torch.randn(2, 3, 28, 28)
        with torch.no_grad():
            feats = bb.column(x)[0][-1]
            again = bb.column(x)[0][-1]
            net.eval()
            evald = bb.column(x)[0][-1]
        assert torch.equal(feats, again) and torch.equal(feats, evald)  # no drop-path, no dropout
    frozen = [n for n, p in bb.vit.named_parameters() if p.requires_grad]
    assert frozen == [] if adapter != "lora" else all(".lora_" in n for n in frozen)


def test_dinov2_at_patch_16_from_a_saved_patch_14_state_dict(tmp_path):
    import timm
    import torch.nn.functional as F

    from blindseg_dist.model import build_backbone

    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=1, embed_dim=32,
                            num_heads=2)
    state = src.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 32)  # 518 / 14
    path = tmp_path / "dinov2_p14.pth"
    torch.save(state, path)
    bb = build_backbone("timm:vit_small_patch14_dinov2", pretrained=path,
                        timm_kwargs=dict(depth=1, embed_dim=32, num_heads=2),
                        vit=dict(pyramid_channels=16, patch_size=16, blocks=[0, 0, 0, 0]))
    assert bb.patch == 16 and bb.vit.patch_embed.grid_size == (32, 32)
    want_w = F.interpolate(state["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(bb.vit.patch_embed.proj.weight.detach(), want_w, rtol=0, atol=0)
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    want_pe = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 32)
    pe = bb.vit.pos_embed.detach()
    assert torch.equal(pe[:, :1], state["pos_embed"][:, :1])  # the class token's position is kept
    torch.testing.assert_close(pe[:, 1:], want_pe, rtol=0, atol=0)
    assert torch.equal(bb.vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert not bb.pretrained_report["missing"]
    feats, _ = bb(torch.randn(1, 3, 64, 64))
    assert feats[3].shape[-2:] == (4, 4)  # 64 / 16
