"""Covariance matching (CML) and cross-covariance (CCL) losses on the IN outputs (docs/METHOD.md, "Losses").

Both take the sequences of (B, C, H, W) instance-normalized features of the original view
(`feats`, detached inside: stop-gradient) and of the augmented view (`feats_aug`), one
tensor per IN point, and average over the points.

Scopes (docs/DISTRIBUTED.md, "Loss scopes"):
- "image": one Sigma per image; loss = sum of per-image losses / global number of images,
  scaled by dist.global_mean so that DDP's gradient averaging is exact on uneven splits.
- "batch": Gram sums and pixel counts pooled over the global batch with one all-reduce
  (CML: the upper triangle of S(sg F) - S(F_a), all CML needs; CCL: the diagonal);
  Sigma = S / (n - 1) + eps I, eps added once after the reduction. The loss is identical on
  every rank and is NOT scaled; its backward all-reduce is skipped
  (dist.all_reduce_sum_identical multiplies the local gradient by W, which is what that
  all-reduce would return: W x the 1-process gradient, which DDP averages back).
Math runs in float32 (float64 stays float64) with autocast disabled: Gram sums over ~1e5
pixels overflow fp16. Proven by tests/losses/test_covariance.py and test_dist_scopes.py.

Both losses read the augmented view through one autograd node per IN point (`_AugStats`): the
Gram F_a F_a^T (CML) and the diagonal of sg(F) F_a^T (CCL). `covariance_losses` computes the
two losses together so that their gradients reach F_a as one tensor (docs/METHOD.md,
"CML and CCL in one pass", under "Losses").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from blindseg_dist import dist
from blindseg_dist.config import COVARIANCE_SCOPES as SCOPES


def _check(feats: Sequence[torch.Tensor], feats_aug: Sequence[torch.Tensor], scope: str,
           name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if scope not in SCOPES:
        raise ValueError(f"{name}: scope={scope!r} is not one of {SCOPES}; "
                         f"set loss.covariance_scope in the config to one of them")
    if isinstance(feats, torch.Tensor):
        feats, feats_aug = [feats], [feats_aug]
    feats, feats_aug = list(feats), list(feats_aug)
    if len(feats) != len(feats_aug) or not feats:
        raise ValueError(f"{name}: got {len(feats)} original and {len(feats_aug)} augmented "
                         "feature maps; pass one (B, C, H, W) tensor per IN point for each view")
    for k, (f, fa) in enumerate(zip(feats, feats_aug)):
        if f.dim() != 4 or f.shape != fa.shape:
            raise ValueError(f"{name}: IN point {k}: expected two (B, C, H, W) tensors of the "
                             f"same shape, got {tuple(f.shape)} and {tuple(fa.shape)}")
        if f.shape[2] * f.shape[3] < 2:
            raise ValueError(f"{name}: IN point {k} has {f.shape[2]}x{f.shape[3]} pixels; "
                             "the (N - 1) normalisation needs at least 2")
    return feats, feats_aug


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _flat_views(f: torch.Tensor, fa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dt = _math_dtype(fa)
    x = f.detach().flatten(2).to(dt)  # (B, C, N), stop-gradient on the original view
    xa = fa.flatten(2).to(dt)  # (B, C, N)
    return x, xa


class _AugStats(torch.autograd.Function):
    """Per image, the two statistics the losses take from the augmented view F_a (B, C, N):
    S_a = F_a F_a^T (B, C, C) for CML and d = diag(sg(F) F_a^T) (B, C) for CCL.

    The backward is dF_a = (g_S + g_S^T) F_a + g_d * sg(F), as ONE batched product with the CCL
    term added in the same call (baddbmm). Autograd's own graph for `F_a @ F_a.T` makes two
    C x C x N products (one per operand) and adds them; `(F * F_a).sum(-1)` writes a (B, C, N)
    product; and the two losses' gradients are added once more where they meet. Either
    statistic may be skipped (an empty tensor) when its loss is off.
    """

    @staticmethod
    def forward(ctx, xa: torch.Tensor, x: torch.Tensor, gram: bool, cross: bool):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xa if gram else None, x if cross else None)
        s = torch.bmm(xa, xa.transpose(1, 2)) if gram else xa.new_empty(0)
        # batched dot products: no (B, C, N) temporary
        d = torch.einsum("bcn,bcn->bc", x, xa) if cross else xa.new_empty(0)
        return s, d

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s, g_d):
        xa, x = ctx.saved_tensors
        grad = g_d.unsqueeze(-1) * x if g_d is not None and x is not None else None
        if g_s is not None and xa is not None:
            sym = g_s + g_s.transpose(1, 2)
            grad = torch.bmm(sym, xa) if grad is None else torch.baddbmm(grad, sym, xa)
        return grad, None, None, None


def _stats(f: torch.Tensor, fa: torch.Tensor, gram: bool, cross: bool):
    """(S = sg(F) sg(F)^T, S_a, d, N) per image for one IN point; S is None without CML."""
    x, xa = _flat_views(f, fa)
    s_a, d = _AugStats.apply(xa, x, gram, cross)
    s = torch.bmm(x, x.transpose(1, 2)) if gram else None
    return s, s_a, d, x.shape[-1]


def covariance_losses(feats: Sequence[torch.Tensor], feats_aug: Sequence[torch.Tensor], *,
                      scope: str = "image", eps: float = 1e-5, cml: bool = True,
                      ccl: bool = True) -> dict[str, torch.Tensor]:
    """CML and/or CCL in one pass over the IN points: {"cml": ..., "ccl": ...} for those asked.

    The values and gradients are those of `covariance_matching_loss` and `cross_covariance_loss`
    (which call this); computing both here lets their gradients reach F_a as one tensor.
    """
    if not (cml or ccl):
        raise ValueError("covariance_losses: ask for at least one of cml, ccl")
    names = [n for n, on in (("cml", cml), ("ccl", ccl)) if on]
    feats, feats_aug = _check(feats, feats_aug, scope, "covariance_matching_loss" if cml else
                              "cross_covariance_loss")
    dev, b = feats_aug[0].device, feats_aug[0].shape[0]
    with torch.autocast(device_type=dev.type, enabled=False):
        stats = [_stats(f, fa, cml, ccl) for f, fa in zip(feats, feats_aug)]
        if scope == "image":
            return {name: _image_scope(stats, name, b, eps) for name in names}
        out = {}
        if cml:
            out["cml"] = _batch_cml(stats, b)
        if ccl:
            out["ccl"] = _batch_ccl(stats, b, eps)
        return out


def _image_scope(stats: list, name: str, b: int, eps: float) -> torch.Tensor:
    """CML or CCL per image, averaged over the global batch, then over the IN points."""
    b_global = dist.all_reduce_count([b], tag=name)[0]
    total = 0.0
    for s, s_a, d, n in stats:
        if name == "cml":
            # (Sigma + eps I) - (Sigma_a + eps I): the eps I cancels
            per_image = ((s - s_a) / (n - 1)).pow(2).mean(dim=(1, 2))  # (B,)
        else:
            per_image = (d / (n - 1) + eps - 1).pow(2).mean(-1)  # (B,)
        total = total + dist.global_mean(per_image.sum(), b_global)
    return total / len(stats)


def _batch_cml(stats: list, b: int) -> torch.Tensor:
    """CML of the global batch. Per point only the pooled difference D = S(sg F) - S(F_a) matters
    (Sigma - Sigma_a = D / (n - 1): the eps I cancels), and D is symmetric, so its upper triangle
    is all that is sent: C (C + 1) / 2 values per point instead of 2 C^2."""
    ups, shapes = [], []
    for s, s_a, _, n in stats:
        c = s.shape[1]
        iu = torch.triu_indices(c, c, device=s.device)
        diff = s.sum(0) - s_a.sum(0)
        ups.append(diff[iu[0], iu[1]])  # (C (C + 1) / 2,) local upper triangle
        shapes.append((c, n, iu[0] == iu[1]))
    # The loss below is a function of the pooled sums only: identical on every rank, so
    # the backward all-reduce is skipped (dist.all_reduce_sum_identical: W x the local
    # gradient is exactly what that all-reduce would return).
    pooled = dist.all_reduce_sum_identical(torch.cat(ups), tag="cml")
    b_global = int(dist.all_reduce_count([b], tag="cml")[0])
    total, off = 0.0, 0
    for c, n_img, diag in shapes:
        k = c * (c + 1) // 2
        dd = pooled[off: off + k] / (b_global * n_img - 1)
        off += k
        sq = dd.pow(2)  # off-diagonal entries stand for two of the C x C
        total = total + (2 * sq.sum() - sq[diag].sum()) / (c * c)
    return total / len(stats)


def _batch_ccl(stats: list, b: int, eps: float) -> torch.Tensor:
    """CCL of the global batch: the diagonal of the pooled cross-covariance (identical loss on
    every rank: no backward all-reduce, as for CML)."""
    pooled = dist.all_reduce_sum_identical(torch.cat([d.sum(0) for _, _, d, _ in stats]), tag="ccl")
    b_global = int(dist.all_reduce_count([b], tag="ccl")[0])
    total, off = 0.0, 0
    for _, _, d, n_img in stats:
        c = d.shape[1]
        diag = pooled[off: off + c] / (b_global * n_img - 1) + eps  # eps once, after
        off += c
        total = total + (diag - 1).pow(2).mean()
    return total / len(stats)


def covariance_matching_loss(feats: Sequence[torch.Tensor], feats_aug: Sequence[torch.Tensor],
                             *, scope: str = "image", eps: float = 1e-5) -> torch.Tensor:
    """CML: mean squared difference of channel covariances, averaged over the IN points.

    "image": Sigma_i = F_i F_i^T / (N - 1) + eps I per image; per point the mean over all
    B*C*C entries of (Sigma(sg F) - Sigma(F_a))^2. "batch": one Sigma per point from the
    global batch (mean over the C*C entries).
    """
    return covariance_losses(feats, feats_aug, scope=scope, eps=eps, cml=True, ccl=False)["cml"]


def cross_covariance_loss(feats: Sequence[torch.Tensor], feats_aug: Sequence[torch.Tensor],
                          *, scope: str = "image", eps: float = 1e-5) -> torch.Tensor:
    """CCL: push the diagonal of sg(F) F_a^T / (N - 1) + eps I to 1.

    "image": per image the mean over the C diagonal entries of (diag - 1)^2, averaged over
    the global batch, then over the IN points. "batch": the diagonal of the global-batch
    cross-covariance. Only the diagonal is constrained, so only it is computed.
    """
    return covariance_losses(feats, feats_aug, scope=scope, eps=eps, cml=False, ccl=True)["ccl"]
