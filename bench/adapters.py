"""Costs of the four ways to train a ViT BlindNet (docs/ADAPTERS.md, "Costs"): full fine-tuning, a frozen
encoder (model.freeze_backbone), Rein and LoRA, for DINOv2-S/B/L and DINOv3-L.

Per (backbone, mode), from the network built on the meta device (no weights allocated, nothing downloaded):
- trained / total parameters;
- optimizer-state bytes: AdamW keeps exp_avg and exp_avg_sq of every trained tensor (2 x 4 bytes each);
- checkpoint bytes: model.safetensors (every tensor in full fine-tuning; the trained ones and the
  frozen encoder's buffers left out when the encoder is frozen and loaded from a file) + the optimizer state;
- gradient all-reduce bytes per step: DDP reduces the fp32 gradient of every trained tensor once per
  optimizer step (the payload; a ring all-reduce moves 2 (W-1)/W times it per rank);
- GPU activation memory at crop 512, per image and view: the bytes autograd saves for the backward pass,
  counted exactly with saved-tensor hooks during a bf16 forward on the meta device, with attention
  saving what a flash / memory-efficient kernel saves (q, k, v, output and the per-row log-sum-exp),
  parameters excluded, shared storages counted once. BlindNet runs two views per step: x2.
For the small models (--measure), a CPU step (two-view BlindNet forward + backward + AdamW) at a small crop
is timed in a subprocess per mode, which also reports its peak resident set (ru_maxrss).

    .venv/bin/python bench/adapters.py [--backbones dinov2_s,dinov2_b,dinov2_l,dinov3_l]
        [--measure dinov2_s] [--crop 112] [--steps 3] [--out bench/results/adapters.json]

Prints a table and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONES = {"dinov2_s": "timm:vit_small_patch14_dinov2", "dinov2_b": "timm:vit_base_patch14_dinov2",
             "dinov2_l": "timm:vit_large_patch14_dinov2", "dinov3_l": "timm:vit_large_patch16_dinov3"}
MODES = ("full", "frozen", "rein", "lora")


def model_kwargs(backbone: str, mode: str) -> dict:
    from blindseg_dist.config import load_config, model_kwargs as mk

    over = [f"model.backbone={BACKBONES[backbone]}"]
    if backbone.startswith("dinov2"):
        over.append("model.patch_size=16")  # the Rein setting: 512 / 16 = a 32 x 32 grid
    if mode == "frozen":
        over.append("model.freeze_backbone=true")
    elif mode in ("rein", "lora"):
        over.append(f"model.adapter={mode}")
    if mode == "lora":
        depth = {"dinov2_s": 12, "dinov2_b": 12}.get(backbone, 24)
        over.append(f"model.lora_blocks=[{depth // 3},{depth - 1}]")  # SoMA: blocks 8-23 of 24
    return mk(load_config("scaling/_base", over))


class _FlashSDPA(torch.autograd.Function):
    """Attention that saves what a flash kernel saves (q, k, v, out, logsumexp); forward only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run
        raise NotImplementedError


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FlashSDPA.apply(q, k, v)


def count(backbone: str, mode: str, crop: int = 512) -> dict:
    from blindseg_dist.engine.checkpoint import frozen_state_keys
    from blindseg_dist.model import build_model

    kwargs = model_kwargs(backbone, mode)
    with torch.device("meta"):
        net = build_model(**kwargs)
    total = sum(p.numel() for p in net.parameters())
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    state = net.state_dict()
    frozen = frozen_state_keys(net) if mode != "full" else set()
    weights = sum(v.numel() * v.element_size() for k, v in state.items() if k not in frozen)
    optim = 2 * 4 * trained
    saved = activation_bytes(net.to(torch.bfloat16), crop)
    return {"backbone": backbone, "mode": mode, "total_params": total, "trained_params": trained,
            "optimizer_state_bytes": optim, "checkpoint_bytes": weights + optim, "weights_file_bytes": weights,
            "allreduce_bytes_per_step": 4 * trained, "activation_bytes_512_per_view": saved}


def activation_bytes(net, crop: int) -> int:
    params = {id(p) for p in net.parameters()} | {id(b) for b in net.buffers()}
    kept: list = []
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            kept.append(base)  # alive until the end: ids stay unique
            total += base.numel() * base.element_size()
        return t

    x = torch.empty(2, 3, crop, crop, device="meta", dtype=torch.bfloat16)  # 2: BN in training needs 2
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa
    try:
        net.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x, dense_embeds=False)
    finally:
        F.scaled_dot_product_attention = orig
    return total // 2  # per image


def measure_step(backbone: str, mode: str, crop: int, steps: int) -> dict:
    """CPU: median time of a BlindNet training step and the process's peak RSS (in a subprocess)."""
    code = f"""
import json, resource, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from bench.adapters import model_kwargs
from blindseg_dist.config import LossConfig
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective
torch.manual_seed(0)
net = build_model(**model_kwargs({backbone!r}, {mode!r}))
obj = BlindNetObjective(net, LossConfig()).train()
opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, {crop}, {crop}, generator=g); xa = x + 0.3 * torch.randn(x.shape, generator=g)
y = torch.randint(0, 19, (2, {crop}, {crop}), generator=g)
times = []
for i in range({steps} + 1):
    t = time.perf_counter()
    out = obj(x, y, xa, step=i)
    out["total"].backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
times = sorted(times[1:])
print(json.dumps({{"step_s": times[len(times) // 2], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", default="dinov2_s,dinov2_b,dinov2_l,dinov3_l")
    ap.add_argument("--measure", default="dinov2_s", help="backbones whose CPU step is timed ('' for none)")
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/adapters.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for b in a.backbones.split(","):
        for m in MODES:
            r = count(b, m)
            if b in a.measure.split(","):
                r.update({f"cpu_{k}": v for k, v in measure_step(b, m, a.crop, a.steps).items()})
            rows.append(r)
            print(f"{b:9s} {m:7s} done", file=sys.stderr, flush=True)
    mb = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    head = ("backbone", "mode", "trained", "total", "optim MB", "ckpt MB", "all-reduce MB/step",
            "act. GiB @512 per image (2 views)", f"CPU s/step @{a.crop}", "peak RSS MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cpu = (f"{r['cpu_step_s']:.2f}", f"{r['cpu_peak_rss_mib']:.0f}") if "cpu_step_s" in r else ("-", "-")
        lines.append("| " + " | ".join([r["backbone"], r["mode"], f"{r['trained_params'] / 1e6:.2f}M",
                                        f"{r['total_params'] / 1e6:.1f}M", mb(r["optimizer_state_bytes"]),
                                        mb(r["checkpoint_bytes"]), mb(r["allreduce_bytes_per_step"]),
                                        f"{2 * r['activation_bytes_512_per_view'] / 2**30:.2f}", *cpu]) + " |")
    print("\n".join(lines))
    out = {"command": "bench/adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "threads": a.threads, "crop": a.crop, "rows": rows,
           "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
