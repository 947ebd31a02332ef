"""DeepLabV3+ vs Mask2Former on ViT-S and ViT-L: parameters, FLOPs, CPU step time, matcher share.

For each backbone (DINOv2 ViT-S/14 and ViT-L/14 converted to patch 16, Rein adapter, the Rein pyramid
taps: the last block of each quarter for ViT-S, blocks 7/11/15/23 for ViT-L, output stride 32) and
each head:

* parameters: the inference network (backbone + head), of it the head, and the trained ones (Rein's
  layers, the pyramid, the head; the backbone is frozen);
* fvcore GFLOPs (one multiply-add = one FLOP) of the eval forward of one 512x512 image, and of one
  1024x2048 image evaluated with the sliding window (512, stride 341: 3 x 6 = 18 windows of 512; the
  per-window FLOPs times the window count, the averaging of the windows not counted);
* the CPU time of one BlindNet training step (both views, the four BlindNet losses, no aux head;
  Mask2Former: its set loss with deep supervision) at ``--crop``, ``--batch`` images, forward +
  backward, after ``--warmup`` untimed steps, the mean of ``--steps``;
* Mask2Former only: the share of the step spent in transformers' Hungarian matcher (cost matrices
  on sampled points + scipy's linear_sum_assignment, every decoder layer, both views), timed by
  wrapping the matcher's forward.

Each (backbone, head) runs in a fresh subprocess. Writes ``--out`` (JSON) and prints a table.

    .venv/bin/python bench/m2f_heads.py --crop 128 --batch 2 --steps 2 --out bench/results/m2f_heads.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BACKBONES = {
    "ViT-S": ["model.backbone=timm:vit_small_patch14_dinov2"],
    "ViT-L": ["model.backbone=timm:vit_large_patch14_dinov2", "model.vit_blocks=[7, 11, 15, 23]"],
}
HEADS = ("deeplabv3plus", "mask2former")
COMMON = ["model.patch_size=16", "model.adapter=rein", "model.output_stride=32", "loss.aux=0", "run.mixed_precision=no"]


def _windows(n: int, crop: int = 512, stride: int = 341) -> int:
    starts = list(range(0, n - crop + 1, stride))
    return len(starts) + (starts[-1] != n - crop)


def measure(backbone: str, head: str, crop: int, batch: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from blindseg_dist.config import load_config, model_kwargs
    from blindseg_dist.model import build_model
    from blindseg_dist.model.objective import BlindNetObjective
    from blindseg_dist.tools.flops import count_gflops

    cfg = load_config(None, BACKBONES[backbone] + COMMON + [f"model.decode_head={head}"])
    kw = model_kwargs(cfg)
    torch.manual_seed(0)
    net = build_model(**kw)
    inference = sum(p.numel() for p in net.inference_parameters())
    head_params = sum(p.numel() for p in net.decoder.parameters())
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    infer_net = build_model(**{**kw, "proj_heads": False, "aux": False})
    g512 = count_gflops(infer_net, (512, 512))
    windows = _windows(1024) * _windows(2048)
    del infer_net

    obj = BlindNetObjective(net, cfg.loss, run_seed=0).train()
    matcher_s = [0.0]
    if obj.m2f is not None:
        matcher = obj.m2f.hf.matcher
        inner = matcher.forward

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                matcher_s[0] += time.perf_counter() - t0

        matcher.forward = timed
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, crop, crop, generator=g)
    image_aug = torch.randn(batch, 3, crop, crop, generator=g)
    label = torch.randint(0, 19, (batch, crop, crop), generator=g)
    times, shares = [], []
    for i in range(warmup + steps):
        matcher_s[0] = 0.0
        obj.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = obj(image, label, image_aug, step=i, global_index=torch.arange(batch))
        out["total"].backward()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            shares.append(matcher_s[0] / dt)
    return {
        "backbone": backbone, "head": head, "overrides": BACKBONES[backbone] + COMMON + [f"model.decode_head={head}"],
        "params_inference": inference, "params_head": head_params, "params_trained": trained,
        "gflops_512": g512, "gflops_1024x2048_sliding": g512 * windows, "sliding_windows": windows,
        "crop": crop, "batch": batch, "threads": threads, "step_s": sum(times) / len(times), "step_s_all": times,
        "matcher_share": (sum(shares) / len(shares)) if obj.m2f is not None else None,
    }


def table(rows: list[dict]) -> str:
    head = ("backbone", "head", "params (M)", "head (M)", "trained (M)", "GFLOPs 512^2", "GFLOPs 1024x2048 sw",
            "step s (mean / min)", "matcher share")
    lines = [head]
    for r in rows:
        lines.append((r["backbone"], r["head"], f"{r['params_inference'] / 1e6:.1f}", f"{r['params_head'] / 1e6:.1f}",
                      f"{r['params_trained'] / 1e6:.1f}", f"{r['gflops_512']:.1f}",
                      f"{r['gflops_1024x2048_sliding']:.0f}", f"{r['step_s']:.1f} / {min(r['step_s_all']):.1f}",
                      "-" if r["matcher_share"] is None else f"{100 * r['matcher_share']:.1f}%"))
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "m2f_heads.json"))
    ap.add_argument("--table", metavar="JSON", nargs="+", help="print the table of earlier results and exit")
    ap.add_argument("--one", nargs=2, metavar=("BACKBONE", "HEAD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]))
        return
    if args.one:
        print(json.dumps(measure(*args.one, args.crop, args.batch, args.warmup, args.steps, args.threads)))
        return
    rows = []
    for b in args.backbones:
        for h in args.heads:
            cmd = [sys.executable, __file__, "--one", b, h, "--crop", str(args.crop), "--batch", str(args.batch),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(f"{b} {h} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{b} {h}: {rows[-1]['step_s']:.2f} s/step", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": "CPU", "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    text = table(rows)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
