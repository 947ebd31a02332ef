"""FLOPs and parameter counts of the deployed network (fvcore), BlindNet vs the baseline.

BlindNet adds nothing at inference, so its eval-mode network and the baseline's (the same model
built without the training-only heads) must give equal numbers; both are reported to show it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ..model import build_model, count_parameters

__all__ = ["CONVENTION", "compute_flops", "count_gflops", "count_gflops_parts", "format_flops_table", "sdpa_flop_jit", "meta_gmacs",
           "zero_memory_bytes"]

CONVENTION = "fvcore: one multiply-add = one FLOP; eval-mode forward of one image"


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle of aten::scaled_dot_product_attention (ViT attention; fvcore skips it by
    default): q @ k^T and attn @ v, B*heads*N*M*(d + d_v) multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    n, d = q[-2], q[-1]
    m, dv = k[-2], v[-1]
    return batch * n * m * (d + dv)


def count_gflops(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """fvcore FLOPs (multiply-adds) of ``model`` in eval mode on one zero image of ``size``, in 1e9
    (attention through scaled_dot_product_attention included: ``sdpa_flop_jit``)."""
    return count_gflops_parts(model, size)[0]


def count_gflops_parts(model: torch.nn.Module, size: tuple[int, int],
                       parts: tuple[str, ...] = ()) -> tuple[float, dict[str, float]]:
    """``count_gflops`` and, from the same trace, the GFLOPs of the submodules named in ``parts``
    (e.g. "backbone", "decoder")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import-time FutureWarning, jit TracerWarnings
        from fvcore.nn import FlopCountAnalysis

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                analysis = FlopCountAnalysis(model, torch.zeros(1, 3, *size))
                analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
                fvcore_log = logging.getLogger("fvcore")
                level = fvcore_log.level
                fvcore_log.setLevel(logging.ERROR)
                try:
                    total = analysis.total()
                    by_module = analysis.by_module()
                    part_flops = {p: by_module.get(p, 0) / 1e9 for p in parts}
                finally:
                    fvcore_log.setLevel(level)
        finally:
            model.train(was_training)
    return total / 1e9, part_flops


def meta_gmacs(model_kwargs: dict[str, Any], size: tuple[int, int]) -> float:
    """Multiply-adds (1e9) of the eval-mode inference network on one image of ``size``, counted by
    torch.utils.flop_counter on the meta device (no weights, no compute: large models at full
    resolution in seconds). It counts matmuls, convolutions and attention (FLOPs / 2 = MACs), not
    the norms and resizes fvcore also counts, and it counts transposed convolutions its own way, so it
    differs from ``count_gflops`` by a few percent (tests/model/test_vit.py bounds the difference;
    ViT-S/16 at 512x1024: 158.7 here, 153.2 fvcore)."""
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {**model_kwargs, "pretrained": None, "aux": False, "proj_heads": False}
    with torch.device("meta"):
        model = build_model(**kwargs).eval()
        x = torch.zeros(1, 3, int(size[0]), int(size[1]))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def zero_memory_bytes(trainable: int, frozen: int = 0, *, world: int = 8, optimizer: str = "adamw",
                      precision: str = "bf16") -> dict[str, float]:
    """Bytes per GPU of weights + gradients + optimizer state under ZeRO stages 0-3 on ``world``
    GPUs (the ZeRO paper's model; activations and buffers excluded). bf16: 16-bit weights and
    gradients, fp32 master weights in the optimizer state (AdamW: master + 2 moments = 12 B per
    parameter, SGD with momentum: 8 B); fp32: 4 B weights and gradients, AdamW 8 B, SGD 4 B.
    Frozen parameters hold weights only (no gradient, no optimizer state)."""
    w = 2 if precision in ("bf16", "fp16") else 4
    k = {("adamw", 2): 12, ("sgd", 2): 8, ("adamw", 4): 8, ("sgd", 4): 4}[(optimizer, w)]
    n, t, f = world, trainable, frozen
    return {
        "stage0": w * (t + f) + w * t + k * t,
        "stage1": w * (t + f) + w * t + k * t / n,
        "stage2": w * (t + f) + (w + k) * t / n,
        "stage3": (w * (t + f) + (w + k) * t) / n,
    }


def compute_flops(model_kwargs: dict[str, Any], size: tuple[int, int] = (1024, 2048)) -> dict[str, Any]:
    """Count the inference network of ``build_model(**model_kwargs)`` and of its baseline.

    ``pretrained`` is ignored (weights do not change the counts). Returns
    {"size": [H, W], "convention": str,
     "model": {"inference": {"params", "gflops"}, "training_only": {"params"}},
     "baseline": {"inference": {"params", "gflops"}}}.
    """
    kwargs = {**model_kwargs, "pretrained": None}
    size = (int(size[0]), int(size[1]))
    model = build_model(**kwargs)
    counts = count_parameters(model)
    baseline = build_model(**{**kwargs, "aux": False, "proj_heads": False})
    total, parts = count_gflops_parts(model, size, ("backbone", "decoder"))
    return {
        "size": list(size),
        "convention": CONVENTION,
        "model": {
            "inference": {"params": counts["inference"], "gflops": total},
            "training_only": {"params": counts["aux"] + counts["proj_heads"]},
            "backbone": {"params": sum(p.numel() for p in model.backbone.parameters()), "gflops": parts["backbone"]},
            "decode_head": {"name": model.decode_head, "params": sum(p.numel() for p in model.decoder.parameters()),
                            "gflops": parts["decoder"]},
        },
        "baseline": {
            "inference": {"params": count_parameters(baseline)["inference"], "gflops": count_gflops(baseline, size)},
        },
    }


def format_flops_table(result: dict[str, Any]) -> str:
    """A small text table of a ``compute_flops`` result."""
    h, w = result["size"]
    model, base = result["model"], result["baseline"]["inference"]
    rows = [
        ("network", "params (M)", f"GFLOPs @ {h}x{w}"),
        ("BlindNet (inference)", f"{model['inference']['params'] / 1e6:.3f}", f"{model['inference']['gflops']:.1f}"),
        ("baseline (inference)", f"{base['params'] / 1e6:.3f}", f"{base['gflops']:.1f}"),
        ("BlindNet training-only heads", f"{model['training_only']['params'] / 1e6:.3f}", "-"),
    ]
    if "decode_head" in model:  # results written before the split have no such rows
        rows[2:2] = [("  backbone", f"{model['backbone']['params'] / 1e6:.3f}", f"{model['backbone']['gflops']:.1f}"),
                     (f"  decode head ({model['decode_head']['name']})", f"{model['decode_head']['params'] / 1e6:.3f}",
                      f"{model['decode_head']['gflops']:.1f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines + [f"({result['convention']})"])
