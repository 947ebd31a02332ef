"""Synchronized BatchNorm that also runs on the CPU (gloo), where torch.nn.SyncBatchNorm refuses.

Batch statistics are the per-channel sums of x and x^2 and the element count, all-reduced with
the autograd all-reduce of dist.py. Why the gradient is exact: rank q's input x_q reaches every
rank's loss L_r only through the global statistics, and the all-reduce's backward sums
dL_r/dstats over ranks, so x_q receives sum_r dL_r/dx_q = W * d(mean_r L_r)/dx_q, which is the
contract of docs/DISTRIBUTED.md, "The contract" (DDP's 1/W averaging then yields the single-process gradient).
Proven by tests/engine/test_train_step_ddp.py. On CUDA, torch's own SyncBatchNorm is used.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import dist


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch (every rank)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        # float32 at least (fp16/bf16 sums overflow), float64 stays float64: x.float() would
        # silently round a float64 model's statistics to float32 (tests run in float64)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.tensor([x.numel() / c], dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])  # (2C + 1,)
        stats = dist.all_reduce_sum(stats, tag="syncbn")
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased: used to normalize
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a synchronized one (torch's on CUDA, ours elsewhere); call before prepare()."""
    if torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        out = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        # Take over the very Parameter / buffer objects (as torch's convert does), not copies into
        # fresh float32 CPU tensors: a copy would turn a .double() / .half() / CUDA model's BN
        # weights back into float32 CPU ones (found by tests/engine/test_train_step_ddp.py: fp32
        # BN gradients in a float64 model) and orphan parameters an optimizer already holds.
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out


__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]
