"""The Mask2Former head (model/mask2former.py): Rein's token queries against the released
arithmetic, the token-query decoder against transformers' own module, semantic inference, the
eval forward (whole image and sliding window) on a CNN and a ViT pyramid, and its config keys."""
from __future__ import annotations

import pytest
import torch

from blindseg_dist.config import ConfigError, load_config, model_kwargs
from blindseg_dist.engine.evaluate import make_predictor
from blindseg_dist.model import build_model
from blindseg_dist.model.mask2former import Mask2FormerHead, TokenQueries, semantic_inference

TINY = dict(hidden_dim=32, queries=6, encoder_layers=1, decoder_layers=2, heads=2, points=32)


def _released_link_token_to_query(tokens, w_t, b_t, w_m, b_m, w_f, b_f):
    """The released Reins.return_auto + ReinMask2FormerHead query arithmetic, in plain tensor ops:
    transform every layer's tokens, (T, d, L) max / mean / last over the layers concatenated on a
    last axis of 3 and flattened (channel-major), merge; the query features are querys2feat(queries)."""
    n_layers, n_tokens, _ = tokens.shape
    t = (tokens @ w_t.T + b_t).permute(1, 2, 0)  # (T, d, L)
    pooled = torch.cat([t.max(-1, keepdim=True).values, t.sum(-1, keepdim=True) / n_layers, t[:, :, -1:]], dim=-1)
    queries = pooled.reshape(n_tokens, -1) @ w_m.T + b_m  # (T, 3d) -> (T, d)
    return queries, queries @ w_f.T + b_f


def test_token_queries_match_released_arithmetic():
    torch.manual_seed(0)
    tq = TokenQueries(48, 16).double()
    tokens = torch.randn(5, 7, 48, dtype=torch.float64)
    pos, feat = tq(tokens)
    want_pos, want_feat = _released_link_token_to_query(
        tokens, tq.transform.weight, tq.transform.bias, tq.merge.weight, tq.merge.bias, tq.to_feat.weight,
        tq.to_feat.bias)
    torch.testing.assert_close(pos, want_pos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(feat, want_feat, rtol=1e-12, atol=1e-12)
    # the channel-major layout matters: a block layout [max | mean | last] gives other queries
    t = tq.transform(tokens)
    block = tq.merge(torch.cat([t.amax(0), t.mean(0), t[-1]], dim=-1))
    assert not torch.allclose(block, pos)


def test_token_queries_drive_transformers_decoder():
    """With token queries, the head's decoder = transformers' Mask2FormerTransformerModule whose own
    query embeddings hold the token positions / features (same weights)."""
    torch.manual_seed(0)
    chans, strides = (8, 16, 24, 32), (4, 8, 16, 32)
    rein = Mask2FormerHead(chans, strides, 5, token_dim=40, **TINY).double().eval()
    plain = Mask2FormerHead(chans, strides, 5, **TINY).double().eval()
    assert rein.transformer.queries_embedder is None and rein.transformer.queries_features is None
    state = {k: v for k, v in rein.state_dict().items() if not k.startswith("token_queries.")}
    missing = plain.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["transformer.queries_embedder.weight", "transformer.queries_features.weight"]
    tokens = torch.randn(3, 6, 40, dtype=torch.float64)
    pos, feat = rein.token_queries(tokens)
    with torch.no_grad():
        plain.transformer.queries_embedder.weight.copy_(pos)
        plain.transformer.queries_features.weight.copy_(feat)
    feats = [torch.randn(2, c, 64 // s, 64 // s, dtype=torch.float64) for c, s in zip(chans, strides)]
    with torch.no_grad():
        a, b = rein(feats, tokens), plain(feats)
    assert len(a["class_logits"]) == len(a["mask_logits"]) == 3  # initial prediction + 2 layers
    for x, y in zip(a["class_logits"] + a["mask_logits"], b["class_logits"] + b["mask_logits"]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="Rein's tokens"):
        rein(feats)


def test_semantic_inference_is_class_prob_times_mask_prob():
    torch.manual_seed(0)
    cls, msk = torch.randn(2, 4, 6), torch.randn(2, 4, 3, 5)
    got = semantic_inference(cls, msk)
    want = torch.zeros(2, 5, 3, 5)
    for q in range(4):
        want += cls[:, q].softmax(-1)[:, :5, None, None] * msk[:, q, None].sigmoid()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backbone,extra", [
    ("resnet18", {}),
    ("timm:vit_small_patch14_dinov2", dict(timm_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
                                           vit=dict(pyramid_channels=32))),
])
def test_eval_forward_and_sliding_window(backbone, extra):
    torch.manual_seed(0)
    net = build_model(backbone, num_classes=5, output_stride=32, aux=False, proj_heads=False,
                      decode_head="mask2former", mask2former=TINY, **extra).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 5, 70, 90)
    assert float(y.min()) >= 0 and float(y.sum(1).max()) <= TINY["queries"] + 1e-4  # sums of probabilities
    whole = make_predictor([])(net, x, (70, 90))
    torch.testing.assert_close(whole, y)
    slid = make_predictor([64, 43])(net, x, (70, 90))  # 2 x 2 windows of 64
    assert slid.shape == y.shape and torch.isfinite(slid).all()
    assert not torch.allclose(slid, y)
    # a window as large as the image is the whole-image prediction
    torch.testing.assert_close(make_predictor([70, 90, 70, 90])(net, x, (70, 90)), y)


def test_config_keys():
    cfg = load_config(None, ["model.decode_head=mask2former", "model.m2f_queries=50", "model.m2f_decoder_layers=3"])
    kw = model_kwargs(cfg)
    assert kw["decode_head"] == "mask2former" and kw["mask2former"]["queries"] == 50
    assert kw["mask2former"]["decoder_layers"] == 3 and kw["mask2former"]["hidden_dim"] == 256
    assert model_kwargs(load_config(None, []))["mask2former"] is None
    with pytest.raises(ConfigError, match="model.decode_head"):
        load_config(None, ["model.decode_head=upernet"])
    with pytest.raises(ConfigError, match="model.proj_levels"):
        load_config(None, ["model.decode_head=mask2former", "model.proj_levels=[high, dec0, dec1]"])
    with pytest.raises(ConfigError, match="model.proj_levels"):
        load_config(None, ["model.proj_levels=[high, pd8, mask]"])  # DeepLabV3+ has no pixel decoder
    with pytest.raises(ConfigError, match="model.m2f_hidden_dim"):
        load_config(None, ["model.decode_head=mask2former", "model.m2f_hidden_dim=48"])
    load_config(None, ["model.decode_head=mask2former", "model.proj_levels=[high, pd8, mask]"])


def test_flops_reports_the_head():
    from blindseg_dist.tools.flops import compute_flops, format_flops_table

    kw = dict(backbone="resnet18", num_classes=5, output_stride=32, decode_head="mask2former", mask2former=TINY)
    res = compute_flops(kw, size=(64, 64))
    m = res["model"]
    net = build_model(**kw)
    assert m["decode_head"]["name"] == "mask2former"
    assert m["decode_head"]["params"] == sum(p.numel() for p in net.decoder.parameters())
    assert m["backbone"]["params"] + m["decode_head"]["params"] == m["inference"]["params"]
    assert m["decode_head"]["gflops"] > 0 and m["backbone"]["gflops"] > 0
    assert m["backbone"]["gflops"] + m["decode_head"]["gflops"] <= m["inference"]["gflops"] + 1e-9
    assert res["baseline"]["inference"]["params"] == m["inference"]["params"]
    assert "decode head (mask2former)" in format_flops_table(res)


def test_rein_tokens_are_the_queries():
    """model.adapter=rein with this head: the head drops its own queries, reads the backbone's tokens,
    and the set loss trains Rein's token factors through them."""
    from blindseg_dist.model.objective import BlindNetObjective, LossWeights

    cfg = load_config(None, ["model.backbone=timm:vit_small_patch14_dinov2", "model.adapter=rein",
                             "model.decode_head=mask2former", "model.output_stride=32", "model.rein_tokens=6",
                             "model.m2f_queries=6", "model.m2f_hidden_dim=32", "model.m2f_encoder_layers=1",
                             "model.m2f_decoder_layers=1", "model.m2f_points=32", "model.vit_pyramid_channels=32",
                             "model.num_classes=5", "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
                             "loss.two_view=false", "loss.aux=0", "loss.cml=0", "loss.ccl=0", "loss.cwcl=0",
                             "loss.sdcl=0"])
    torch.manual_seed(0)
    net = build_model(**model_kwargs(cfg)).train()
    head = net.decoder
    assert head.token_queries is not None and head.transformer.queries_embedder is None
    tokens = net.backbone.tokens()
    assert tokens.shape == (2, 6, 32)
    obj = BlindNetObjective(net, cfg.loss)
    label = torch.randint(0, 5, (2, 64, 64))
    obj(torch.randn(2, 3, 64, 64), label)["total"].backward()
    rein = [(n, p) for n, p in net.named_parameters() if p.requires_grad and "rein" in n]
    assert rein and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in rein), \
        [n for n, p in rein if p.grad is None]
    assert all(p.grad is not None for p in head.token_queries.parameters())
    with pytest.raises(ConfigError, match="model.m2f_queries"):
        load_config(None, ["model.adapter=rein", "model.decode_head=mask2former", "model.rein_tokens=50"])
