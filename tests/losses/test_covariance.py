"""CML / CCL against a direct, loop-based computation of docs/METHOD.md, "Losses" (single process)."""

from __future__ import annotations

import pytest
import torch

from blindseg_dist.losses import covariance_matching_loss, cross_covariance_loss
from blindseg_dist.losses.covariance import _AugStats, covariance_losses

EPS = 1e-5


def _feats(seed, shapes=((3, 3, 4, 4), (3, 5, 2, 3))):
    g = torch.Generator().manual_seed(seed)
    f = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    fa = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return f, fa


def _sigma(a, b, n_pixels_minus_1, eps):
    """Entry-wise sum over pixels: sum_n a[c, n] b[d, n] / (N - 1) + eps * [c == d]."""
    c = a.shape[0]
    out = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            out[i, j] = (a[i] * b[j]).sum() / n_pixels_minus_1 + (eps if i == j else 0.0)
    return out


def naive_cml(feats, feats_aug, scope, eps=EPS):
    per_point = []
    for f, fa in zip(feats, feats_aug):
        x, xa = f.flatten(2), fa.flatten(2)  # (B, C, N)
        if scope == "image":
            n = x.shape[-1]
            sq = [((_sigma(x[i], x[i], n - 1, eps) - _sigma(xa[i], xa[i], n - 1, eps)) ** 2)
                  for i in range(x.shape[0])]
            per_point.append(torch.stack(sq).mean())  # mean over all B*C*C entries
        else:
            xb, xab = x.transpose(0, 1).flatten(1), xa.transpose(0, 1).flatten(1)  # (C, B*N)
            n = xb.shape[1]
            per_point.append(((_sigma(xb, xb, n - 1, eps) - _sigma(xab, xab, n - 1, eps))
                              ** 2).mean())
    return torch.stack(per_point).mean()


def naive_ccl(feats, feats_aug, scope, eps=EPS):
    per_point = []
    for f, fa in zip(feats, feats_aug):
        x, xa = f.flatten(2), fa.flatten(2)
        if scope == "image":
            n = x.shape[-1]
            per_image = [((torch.diagonal(_sigma(x[i], xa[i], n - 1, eps)) - 1) ** 2).mean()
                         for i in range(x.shape[0])]
            per_point.append(torch.stack(per_image).mean())
        else:
            xb, xab = x.transpose(0, 1).flatten(1), xa.transpose(0, 1).flatten(1)
            n = xb.shape[1]
            per_point.append(((torch.diagonal(_sigma(xb, xab, n - 1, eps)) - 1) ** 2).mean())
    return torch.stack(per_point).mean()


@pytest.mark.parametrize("scope", ["image", "batch"])
def test_cml_matches_naive_formula(scope):
    f, fa = _feats(0)
    got = covariance_matching_loss(f, fa, scope=scope)
    torch.testing.assert_close(got, naive_cml(f, fa, scope), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("scope", ["image", "batch"])
def test_ccl_matches_naive_formula(scope):
    f, fa = _feats(1)
    got = cross_covariance_loss(f, fa, scope=scope)
    torch.testing.assert_close(got, naive_ccl(f, fa, scope), rtol=1e-10, atol=1e-14)


def test_ccl_hand_built_value_uses_n_minus_1_and_eps_once():
    # one image, C=2, N=3: F = F_a; diag of F F^T = [3, 0] -> /(N-1) = [1.5, 0] (+eps once)
    f = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)[..., None]
    want = ((1.5 + EPS - 1) ** 2 + (0.0 + EPS - 1) ** 2) / 2
    for scope in ("image", "batch"):
        got = cross_covariance_loss([f], [f.clone()], scope=scope)
        assert float(got) == pytest.approx(want, rel=1e-12)


def test_ccl_ignores_off_diagonal_entries():
    f, fa = _feats(2, shapes=((2, 3, 3, 3),))
    base = cross_covariance_loss(f, fa)
    # add to channel 0 of F_a a vector orthogonal (per image) to channel 0 of F: only
    # off-diagonal entries of sg(F) F_a^T move
    x0 = f[0][:, 0].flatten(1)
    v = torch.randn_like(x0)
    v = v - (v * x0).sum(1, keepdim=True) / (x0 * x0).sum(1, keepdim=True) * x0
    fa3 = [fa[0].clone()]
    fa3[0][:, 0] += v.view_as(fa3[0][:, 0])
    torch.testing.assert_close(cross_covariance_loss(f, fa3), base, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(covariance_matching_loss(f, fa3), covariance_matching_loss(f, fa))


def test_averages_over_in_points():
    f, fa = _feats(3)
    both = covariance_matching_loss(f, fa)
    each = [covariance_matching_loss([a], [b]) for a, b in zip(f, fa)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    both = cross_covariance_loss(f, fa)
    each = [cross_covariance_loss([a], [b]) for a, b in zip(f, fa)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)


@pytest.mark.parametrize("fn", [covariance_matching_loss, cross_covariance_loss])
@pytest.mark.parametrize("scope", ["image", "batch"])
def test_no_gradient_to_the_original_view(fn, scope):
    f, fa = _feats(4)
    f = [t.requires_grad_() for t in f]
    fa = [t.requires_grad_() for t in fa]
    fn(f, fa, scope=scope).backward()
    assert all(t.grad is None for t in f)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in fa)


@pytest.mark.parametrize("fn", [covariance_matching_loss, cross_covariance_loss])
@pytest.mark.parametrize("scope", ["image", "batch"])
def test_bf16_autocast_keeps_float32_math(fn, scope):
    f, fa = _feats(5)
    f32, fa32 = [t.float() for t in f], [t.float() for t in fa]
    want = fn(f32, fa32, scope=scope)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(f32, fa32, scope=scope)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scope", ["image", "batch"])
@pytest.mark.parametrize("which", [(True, True), (True, False), (False, True)])
def test_both_losses_in_one_pass_give_the_naive_values_and_gradients(scope, which):
    """covariance_losses (one autograd node per IN point, the two gradients fused) against the
    naive formulas through plain autograd: values and the gradient of a weighted sum."""
    cml, ccl = which
    f, fa = _feats(7)
    fa = [t.requires_grad_() for t in fa]
    got = covariance_losses(f, fa, scope=scope, cml=cml, ccl=ccl)
    assert set(got) == {n for n, on in (("cml", cml), ("ccl", ccl)) if on}
    fa_ref = [t.detach().clone().requires_grad_() for t in fa]
    want = {"cml": naive_cml(f, fa_ref, scope), "ccl": naive_ccl(f, fa_ref, scope)}
    for name, v in got.items():
        torch.testing.assert_close(v, want[name], rtol=1e-10, atol=1e-14)
    weights = {"cml": 0.7, "ccl": 1.3}
    sum(weights[n] * v for n, v in got.items()).backward()
    sum(weights[n] * want[n] for n in got).backward()
    for t, r in zip(fa, fa_ref):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-9, atol=1e-12)


def test_aug_stats_gradcheck():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    xa = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)  # a NON-symmetric upstream gradient on S
    for gram, cross in ((True, True), (True, False), (False, True)):
        def fn(t, gram=gram, cross=cross):
            s, d = _AugStats.apply(t, x, gram, cross)
            out = (d ** 3).sum() if cross else 0.0
            return out + ((s * w).sum() + (s ** 3).sum() if gram else 0.0)
        assert torch.autograd.gradcheck(fn, (xa,))
    s, d = _AugStats.apply(xa, x, True, True)
    torch.testing.assert_close(s, xa @ xa.transpose(1, 2))
    torch.testing.assert_close(d, (x * xa).sum(-1))


def test_bad_arguments_raise_clear_errors():
    f, fa = _feats(6)
    with pytest.raises(ValueError, match="scope"):
        covariance_matching_loss(f, fa, scope="global")
    with pytest.raises(ValueError, match="same shape"):
        cross_covariance_loss(f, [fa[1], fa[0]])
    with pytest.raises(ValueError, match="at least one"):
        covariance_losses(f, fa, cml=False, ccl=False)
