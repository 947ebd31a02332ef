"""Communication of the distributed loss scopes (issue "Multi-node loss scopes").

1. Bytes per step of every loss collective against the gradient all-reduce, for the reference
   configuration: ResNet-50 BlindNet (aux + projection heads), crop 768, 4 images per GPU,
   covariance scope "batch", contrastive scope "global", CE scope "exact", SyncBN.
   - computed: closed-form counts of what blindseg_dist.dist hands to its collectives (the same
     convention as dist.comm_stats(): bytes this rank passes in, autograd collectives counting
     their backward too); gradient all-reduce = trainable parameters x 4 bytes (fp32);
   - measured: 2 gloo processes run CML/CCL/CWCL/SDCL on random tensors of the real shapes
     (IN outputs 64@384^2, 256@192^2, 512@96^2; embeddings 256@48^2, 256@192^2 x 2) and read
     dist.comm_stats(); SyncBN and CE bytes do not depend on the image size, so they are read
     from one full objective step of the ResNet-50 model at a small crop.
   "wire" columns: bytes each rank sends with ring algorithms, for W ranks: all-reduce
   2 (W-1)/W x size, all-gather (W-1) x local size. A gather grows with W, the gradient
   all-reduce does not, so the loss share is also given at W=16.
2. Step time of 1 and 2 processes (gloo, DDP + SyncBatchNorm2d, SGD) with the "image" scopes
   against the "global" scopes, at a CPU-feasible size; the two configurations alternate
   within each round so that machine noise hits both alike; per step the slowest rank counts.

Goals: loss collectives < 2% of the gradient all-reduce bytes; global scopes cost < 5% step
time against image scopes.

    .venv/bin/python bench/comm.py [--backbone resnet18] [--crop 128] [--batch 2] [--steps 5]

Prints tables and writes bench/results/comm.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blindseg_dist import dist, losses
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.launcher import run_gloo
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights
from blindseg_dist.model.syncbn import convert_sync_batchnorm

SCOPES = {
    "image": LossWeights(ce_scope="exact", covariance_scope="image", contrastive_scope="image"),
    "global": LossWeights(ce_scope="exact", covariance_scope="batch", contrastive_scope="global"),
}
# R50 at crop 768: (channels, side) of the three IN outputs and of the three embeddings
CROP, BATCH = 768, 4
IN_SHAPES = [(64, CROP // 2), (256, CROP // 4), (512, CROP // 8)]
EMB_SHAPES = [(256, CROP // 16), (256, CROP // 4), (256, CROP // 4)]
CWCL_M, SDCL_K, SDCL_CAP, D = 15 * 50, 20, 1000, 256
TAGS = ("cml", "ccl", "cwcl", "sdcl", "seg", "syncbn")


# ----------------------------------------------------------------------------- synthetic data

def synthetic_labels(b: int, crop: int, gen: torch.Generator, classes: int = 19) -> torch.Tensor:
    """Blocky labels (32 px blocks, all 19 classes present) with an ignore strip."""
    coarse = torch.randint(0, classes, (b, -(-crop // 32), -(-crop // 32)), generator=gen)
    label = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :crop, :crop].clone()
    label[:, : crop // 16] = IGNORE
    return label


def _flip(t: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randint(0, 19, t.shape, generator=gen)
    return torch.where(torch.rand(t.shape, generator=gen) < p, noise, t)


# ----------------------------------------------------------------------------- 1. bytes

def trainable_parameters(backbone: str = "resnet50") -> int:
    net = build_model(backbone)  # aux + projection heads: the training network
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def bn_channels_per_view(backbone: str = "resnet50") -> tuple[int, int]:
    """(sum of channels, number of BN layers) that one forward of one view normalizes."""
    net = build_model(backbone)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return sum(m.num_features for m in bns), len(bns)


def computed_bytes(world: int, sdcl_rows: int, sdcl_small: list[int]) -> dict[str, dict[str, float]]:
    """Closed-form bytes per step and rank, with dist.py's counting convention.

    sdcl_rows: negative rows a rank gathers per level (<= 20 x classes present: 380 with all
    19 classes); sdcl_small: per level, the anchor keys a rank sends for the global cap
    (min(anchors before the cap, cap), the largest over ranks: the gather pads to it).
    Returns {tag: {"handed": bytes, "wire": ring bytes sent}}.
    """
    f4, i8 = 4, 8
    out = {}
    gram = sum(2 * c * c for c, _ in IN_SHAPES) * f4  # [S(sg F), S(F_a)] for 3 points
    out["cml"] = {"handed": 2 * gram + i8, "wire": _ar(world) * (2 * gram + i8)}
    diag = sum(c for c, _ in IN_SHAPES) * f4
    out["ccl"] = {"handed": 2 * diag + i8, "wire": _ar(world) * (2 * diag + i8)}
    keys = BATCH * CWCL_M * D * f4 + BATCH * CWCL_M * i8  # keys + class ids, per level
    out["cwcl"] = {"handed": 3 * (i8 + keys), "wire": 3 * (world - 1) * (i8 + keys)}
    counts = (1 + 256 + 256) * i8
    neg = sdcl_rows * D * f4
    sdcl_handed = sum(counts + i8 + small * i8 + i8 + neg * (1 + world) + sdcl_rows * 2 * i8
                      for small in sdcl_small)
    sdcl_wire = sum(_ar(world) * counts + (world - 1) * (2 * i8 + small * i8 + sdcl_rows * 2 * i8)
                    + (world - 1) * neg * 2  # gather forward + reduce-scatter backward
                    for small in sdcl_small)
    out["sdcl"] = {"handed": sdcl_handed, "wire": sdcl_wire}
    out["seg"] = {"handed": 3 * i8, "wire": _ar(world) * 3 * i8}  # ce, aux, ce_aug counts
    ch, n_bn = bn_channels_per_view()
    sbn = 2 * 2 * (2 * ch + n_bn) * f4  # 2 views x (forward + backward) x (sum, sumsq, count)
    out["syncbn"] = {"handed": sbn, "wire": _ar(world) * sbn}
    return out


def _ar(world: int) -> float:
    return 2 * (world - 1) / world


def _bytes_worker(rank: int, world: int) -> dict:
    """Every loss at the real shapes (global scopes), then one small-crop objective step."""
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(rank)
    out, details = {}, {}
    feats = [torch.randn(BATCH, c, s, s, generator=g) for c, s in IN_SHAPES]
    feats_aug = [(f + 0.3 * torch.randn(f.shape, generator=g)).requires_grad_() for f in feats]
    for tag, fn in (("cml", losses.covariance_matching_loss), ("ccl", losses.cross_covariance_loss)):
        dist.reset_comm_stats()
        fn(feats, feats_aug, scope="batch").backward()
        out[tag] = dist.comm_stats().get(tag, 0)
    del feats, feats_aug

    label = synthetic_labels(BATCH, CROP, g)
    small = F.interpolate(label[:, None].float(), size=(CROP // 4,) * 2, mode="nearest")[:, 0].long()
    pred = _flip(small.clamp(max=18), 0.3, g)
    pred_aug = _flip(pred, 0.5, g)
    gidx = torch.arange(rank * BATCH, (rank + 1) * BATCH)
    out["cwcl"] = out["sdcl"] = 0
    details["sdcl_anchors_local"], details["sdcl_rows_local"] = [], []
    for j, (c, s) in enumerate(EMB_SHAPES):
        emb = F.normalize(torch.randn(BATCH, c, s, s, generator=g), dim=1)
        emb_aug = F.normalize(emb + 0.5 * torch.randn(emb.shape, generator=g), dim=1).requires_grad_()
        dist.reset_comm_stats()
        losses.class_wise_contrastive_loss(emb_aug, emb, label, pred, scope="global",
                                           seeds=losses.sample_seeds(1, 0, gidx)).backward()
        out["cwcl"] += dist.comm_stats().get("cwcl", 0)
        dist.reset_comm_stats()
        emb_aug.grad = None
        loss, det = losses.semantic_disentanglement_loss(
            emb_aug, emb, label, pred, pred_aug, scope="global",
            seeds=losses.sample_seeds(2, 0, gidx), return_details=True)
        loss.backward()
        out["sdcl"] += dist.comm_stats().get("sdcl", 0)
        yj = F.interpolate(label[:, None].float(), size=(s, s), mode="nearest")[:, 0].long()
        pj, paj = (F.interpolate(t[:, None].float(), size=(s, s), mode="nearest")[:, 0].long()
                   for t in (pred, pred_aug))
        # anchors before the cap (every class has >= 20 GT pixels here): keys sent for the cap
        details["sdcl_anchors_local"].append(int(((pj == yj) & (paj != pj) & (yj != IGNORE)).sum()))
        details["sdcl_anchors_kept_local"] = details.get("sdcl_anchors_kept_local", []) + [
            int(det["anchors"][0].numel())]
        details["sdcl_rows_local"].append(int(det["candidates"].numel()))
        del emb, emb_aug, loss, det

    # SyncBN and CE counts: independent of the crop; one objective step of the R50 network
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    obj = BlindNetObjective(convert_sync_batchnorm(build_model("resnet50")), SCOPES["global"]).train()
    ddp = DDP(obj)
    crop = 64
    lab = synthetic_labels(2, crop, g)
    dist.reset_comm_stats()
    res = ddp(torch.randn(2, 3, crop, crop, generator=g), lab, torch.randn(2, 3, crop, crop, generator=g),
              step=0, global_index=torch.arange(rank * 2, rank * 2 + 2))
    res["total"].backward()
    stats = dist.comm_stats()
    out["seg"], out["syncbn"] = stats.get("seg", 0), stats.get("syncbn", 0)
    return {"bytes": out, "details": details}


# ----------------------------------------------------------------------------- 2. step time

def _speed_worker(rank: int, world: int, backbone: str, crop: int, batch: int, steps: int,
                  warmup: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(rank)
    data = {"image": torch.randn(batch, 3, crop, crop, generator=g),
            "image_aug": torch.randn(batch, 3, crop, crop, generator=g),
            "label": synthetic_labels(batch, crop, g)}
    runs = {}
    for name, w in SCOPES.items():
        torch.manual_seed(0)
        net = build_model(backbone)
        if world > 1:
            net = convert_sync_batchnorm(net)
        obj = BlindNetObjective(net, w, run_seed=1).train()
        mod = DDP(obj) if world > 1 else obj
        opt = torch.optim.SGD(obj.parameters(), lr=1e-3, momentum=0.9)
        runs[name] = (mod, opt)
    times = {name: [] for name in SCOPES}
    comm = {}
    gidx = torch.arange(rank * batch, (rank + 1) * batch)
    for i in range(warmup + steps):
        order = list(SCOPES) if i % 2 == 0 else list(SCOPES)[::-1]
        for name in order:
            mod, opt = runs[name]
            dist.barrier()
            dist.reset_comm_stats()
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = mod(data["image"], data["label"], data["image_aug"], step=i, global_index=gidx)
            out["total"].backward()
            opt.step()
            dt = time.perf_counter() - t
            if i >= warmup:
                times[name].append(dt)
                comm[name] = dist.comm_stats()
    return {"times": times, "comm": comm}


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18", help="for the step-time part")
    ap.add_argument("--crop", type=int, default=128, help="for the step-time part")
    ap.add_argument("--batch", type=int, default=2, help="images per process, step-time part")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default="bench/results/comm.json")
    args = ap.parse_args()

    # ---- 1. bytes
    params = trainable_parameters()
    grad_bytes = params * 4
    t0 = time.perf_counter()
    measured = run_gloo(_bytes_worker, 2, timeout=1800, collective_timeout_s=300)
    t_bytes = time.perf_counter() - t0
    det = measured[0]["details"]
    rows_max = max(max(m["details"]["sdcl_rows_local"]) for m in measured)
    small_max = [max(min(m["details"]["sdcl_anchors_local"][j], SDCL_CAP * BATCH * 2) for m in measured)
                 for j in range(len(EMB_SHAPES))]  # per level: the padded gather size
    comp2 = computed_bytes(2, rows_max, small_max)
    comp16 = computed_bytes(16, rows_max, small_max)
    grad_wire = {w: _ar(w) * grad_bytes for w in (2, 16)}
    print(f"1. bytes per step and rank: ResNet-50 BlindNet, crop {CROP}, {BATCH} images/GPU, scopes "
          f"covariance=batch, contrastive=global, ce=exact; {params / 1e6:.2f}M trainable parameters "
          f"-> gradient all-reduce {grad_bytes / 1e6:.1f} MB (fp32)")
    hdr = f"{'collective':<10}{'computed MB':>13}{'measured MB':>13}{'% of grad':>11}{'wire % W=2':>12}{'wire % W=16':>13}"
    print(hdr)
    table = {}
    for tag in TAGS:
        meas = max(m["bytes"][tag] for m in measured)
        table[tag] = {
            "computed_bytes": comp2[tag]["handed"], "measured_bytes_rank0": measured[0]["bytes"][tag],
            "measured_bytes_rank1": measured[1]["bytes"][tag],
            "pct_of_grad_allreduce": 100 * meas / grad_bytes,
            "wire_pct_W2": 100 * comp2[tag]["wire"] / grad_wire[2],
            "wire_pct_W16": 100 * comp16[tag]["wire"] / grad_wire[16],
        }
        r = table[tag]
        print(f"{tag:<10}{r['computed_bytes'] / 1e6:>13.3f}{meas / 1e6:>13.3f}{r['pct_of_grad_allreduce']:>10.2f}%"
              f"{r['wire_pct_W2']:>11.2f}%{r['wire_pct_W16']:>12.2f}%")
    tot_meas = sum(max(m["bytes"][t] for m in measured) for t in TAGS)
    tot_comp = sum(comp2[t]["handed"] for t in TAGS)
    tot_w2 = sum(comp2[t]["wire"] for t in TAGS) / grad_wire[2] * 100
    tot_w16 = sum(comp16[t]["wire"] for t in TAGS) / grad_wire[16] * 100
    pct = 100 * tot_meas / grad_bytes
    print(f"{'total':<10}{tot_comp / 1e6:>13.3f}{tot_meas / 1e6:>13.3f}{pct:>10.2f}%{tot_w2:>11.2f}%{tot_w16:>12.2f}%")
    goal_bytes = pct < 2.0
    print(f"goal: loss collectives < 2% of the gradient all-reduce bytes: {'PASS' if goal_bytes else 'FAIL'} "
          f"({pct:.2f}%); SDCL rank 0, per level: anchors before the cap {det['sdcl_anchors_local']}, "
          f"negative rows gathered {det['sdcl_rows_local']}  [{t_bytes:.0f} s]")

    result = {
        "bytes": {"config": {"backbone": "resnet50", "crop": CROP, "images_per_gpu": BATCH,
                             "covariance_scope": "batch", "contrastive_scope": "global", "ce_scope": "exact",
                             "measured_with": "2 gloo processes, dist.comm_stats()"},
                  "trainable_parameters": params, "grad_allreduce_bytes": grad_bytes,
                  "per_collective": table, "total_measured_bytes": tot_meas, "total_computed_bytes": tot_comp,
                  "total_pct_of_grad": pct, "total_wire_pct_W2": tot_w2, "total_wire_pct_W16": tot_w16,
                  "sdcl_details_rank0": det, "goal": "total_pct_of_grad < 2", "pass": goal_bytes},
    }

    # ---- 2. step time
    if not args.skip_speed:
        speed = {}
        for world in (1, 2):
            res = run_gloo(_speed_worker, world, args.backbone, args.crop, args.batch, args.steps,
                           args.warmup, timeout=1800, collective_timeout_s=300)
            per_step = {n: [max(r["times"][n][i] for r in res) for i in range(args.steps)] for n in SCOPES}
            med = {n: statistics.median(v) for n, v in per_step.items()}
            best = {n: min(v) for n, v in per_step.items()}  # least disturbed by other load
            speed[world] = {"median_step_s": med, "min_step_s": best, "all_step_s": per_step,
                            "global_over_image_min": best["global"] / best["image"],
                            "images_per_s": {n: world * args.batch / med[n] for n in SCOPES},
                            "global_over_image": med["global"] / med["image"],
                            "comm_bytes_rank0": res[0]["comm"]}
        print(f"\n2. step time (forward both views + backward + SGD), {args.backbone}, crop {args.crop}, "
              f"{args.batch} images/process, 1 thread/process, gloo, median of {args.steps} "
              f"(slowest rank per step), shared 2-core machine")
        print(f"{'processes':<11}{'image s':>9}{'global s':>10}{'global/image':>14}{'img/s image':>13}"
              f"{'img/s global':>14}{'min: image s':>14}{'global s':>10}{'ratio':>7}")
        for world, s in speed.items():
            m, ips, b = s["median_step_s"], s["images_per_s"], s["min_step_s"]
            print(f"{world:<11}{m['image']:>9.3f}{m['global']:>10.3f}{s['global_over_image']:>14.3f}"
                  f"{ips['image']:>13.2f}{ips['global']:>14.2f}{b['image']:>14.3f}{b['global']:>10.3f}"
                  f"{s['global_over_image_min']:>7.3f}")
        scale = {n: speed[2]["images_per_s"][n] / speed[1]["images_per_s"][n] for n in SCOPES}
        overhead = speed[2]["global_over_image"] - 1
        goal_time = overhead < 0.05
        print(f"2 vs 1 process throughput: image x{scale['image']:.2f}, global x{scale['global']:.2f}")
        print(f"goal: global scopes cost < 5% step time against image scopes (2 processes, medians): "
              f"{'PASS' if goal_time else 'FAIL'} ({100 * overhead:+.1f}%; fastest steps: "
              f"{100 * (speed[2]['global_over_image_min'] - 1):+.1f}%)")
        result["step_time"] = {"backbone": args.backbone, "crop": args.crop, "images_per_process": args.batch,
                               "steps": args.steps, "warmup": args.warmup, "threads_per_process": 1,
                               "by_processes": {str(k): v for k, v in speed.items()},
                               "throughput_2_vs_1": scale, "global_overhead_2proc": overhead,
                               "goal": "global_overhead_2proc < 0.05", "pass": goal_time}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
