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

__all__ = ["CONVENTION", "compute_flops", "count_gflops", "format_flops_table", "sdpa_flop_jit"]

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
                finally:
                    fvcore_log.setLevel(level)
        finally:
            model.train(was_training)
    return total / 1e9


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
    return {
        "size": list(size),
        "convention": CONVENTION,
        "model": {
            "inference": {"params": counts["inference"], "gflops": count_gflops(model, size)},
            "training_only": {"params": counts["aux"] + counts["proj_heads"]},
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
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines + [f"({result['convention']})"])
