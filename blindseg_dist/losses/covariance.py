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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blindseg_dist import dist

SCOPES = ("image", "batch")


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


def covariance_matching_loss(feats: Sequence[torch.Tensor], feats_aug: Sequence[torch.Tensor],
                             *, scope: str = "image", eps: float = 1e-5) -> torch.Tensor:
    """CML: mean squared difference of channel covariances, averaged over the IN points.

    "image": Sigma_i = F_i F_i^T / (N - 1) + eps I per image; per point the mean over all
    B*C*C entries of (Sigma(sg F) - Sigma(F_a))^2. "batch": one Sigma per point from the
    global batch (mean over the C*C entries).
    """
    feats, feats_aug = _check(feats, feats_aug, scope, "covariance_matching_loss")
    dev = feats_aug[0].device
    with torch.autocast(device_type=dev.type, enabled=False):
        if scope == "image":
            b_global = dist.all_reduce_count([feats_aug[0].shape[0]], tag="cml")[0]
            total = 0.0
            for f, fa in zip(feats, feats_aug):
                x, xa = _flat_views(f, fa)
                n = x.shape[-1]
                eye = eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
                sig = x @ x.transpose(1, 2) / (n - 1) + eye  # (B, C, C)
                sig_a = xa @ xa.transpose(1, 2) / (n - 1) + eye  # (B, C, C)
                per_image = (sig - sig_a).pow(2).mean(dim=(1, 2))  # (B,)
                total = total + dist.global_mean(per_image.sum(), b_global)
            return total / len(feats)

        # "batch": per point only the pooled difference D = S(sg F) - S(F_a) matters
        # (Sigma - Sigma_a = D / (n - 1): the eps I cancels), and D is symmetric, so its upper
        # triangle is all that is sent: C (C + 1) / 2 values per point instead of 2 C^2.
        stats, shapes = [], []
        for f, fa in zip(feats, feats_aug):
            x, xa = _flat_views(f, fa)
            c = x.shape[1]
            iu = torch.triu_indices(c, c, device=x.device)
            diff = torch.einsum("bcn,bdn->cd", x, x) - torch.einsum("bcn,bdn->cd", xa, xa)
            stats.append(diff[iu[0], iu[1]])  # (C (C + 1) / 2,) local upper triangle
            shapes.append((c, x.shape[2], iu[0] == iu[1]))
        # The loss below is a function of the pooled sums only: identical on every rank, so
        # the backward all-reduce is skipped (dist.all_reduce_sum_identical: W x the local
        # gradient is exactly what that all-reduce would return).
        pooled = dist.all_reduce_sum_identical(torch.cat(stats), tag="cml")
        b_global = int(dist.all_reduce_count([feats_aug[0].shape[0]], tag="cml")[0])
        total, off = 0.0, 0
        for c, n_img, diag in shapes:
            k = c * (c + 1) // 2
            d = pooled[off: off + k] / (b_global * n_img - 1)
            off += k
            sq = d.pow(2)  # off-diagonal entries stand for two of the C x C
            total = total + (2 * sq.sum() - sq[diag].sum()) / (c * c)
        return total / len(feats)


def cross_covariance_loss(feats: Sequence[torch.Tensor], feats_aug: Sequence[torch.Tensor],
                          *, scope: str = "image", eps: float = 1e-5) -> torch.Tensor:
    """CCL: push the diagonal of sg(F) F_a^T / (N - 1) + eps I to 1.

    "image": per image the mean over the C diagonal entries of (diag - 1)^2, averaged over
    the global batch, then over the IN points. "batch": the diagonal of the global-batch
    cross-covariance. Only the diagonal is constrained, so only it is computed.
    """
    feats, feats_aug = _check(feats, feats_aug, scope, "cross_covariance_loss")
    dev = feats_aug[0].device
    with torch.autocast(device_type=dev.type, enabled=False):
        if scope == "image":
            b_global = dist.all_reduce_count([feats_aug[0].shape[0]], tag="ccl")[0]
            total = 0.0
            for f, fa in zip(feats, feats_aug):
                x, xa = _flat_views(f, fa)
                diag = (x * xa).sum(-1) / (x.shape[-1] - 1) + eps  # (B, C)
                per_image = (diag - 1).pow(2).mean(-1)  # (B,)
                total = total + dist.global_mean(per_image.sum(), b_global)
            return total / len(feats)

        stats, shapes = [], []
        for f, fa in zip(feats, feats_aug):
            x, xa = _flat_views(f, fa)
            stats.append((x * xa).sum(dim=(0, 2)))  # (C,) local diagonal of sum F F_a^T
            shapes.append((x.shape[1], x.shape[2]))
        # identical loss on every rank: no backward all-reduce (see covariance_matching_loss)
        pooled = dist.all_reduce_sum_identical(torch.cat(stats), tag="ccl")
        b_global = int(dist.all_reduce_count([feats_aug[0].shape[0]], tag="ccl")[0])
        total, off = 0.0, 0
        for c, n_img in shapes:
            diag = pooled[off: off + c] / (b_global * n_img - 1) + eps  # eps once, after
            off += c
            total = total + (diag - 1).pow(2).mean()
        return total / len(feats)
