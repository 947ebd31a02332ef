"""Communication of the distributed loss scopes, at any number of GPUs (docs/DISTRIBUTED.md,
"Budgeted global scopes").

1. Bytes per step RECEIVED by one rank from every loss collective, against what it receives in the
   gradient all-reduce, for the reference configuration: ResNet-50 BlindNet (aux + projection
   heads), crop 768, 4 images per GPU, covariance scope "batch", contrastive scope "global"
   (loss.cwcl_global_keys keys), CE scope "exact".
   - computed: closed-form counts with dist.comm_stats()'s wire model (ring all-reduce: 2 (W-1)/W x
     size; gathers: (W-1) x padded rows; all-to-all: exact rows; autograd collectives add their
     backward), averaged over ranks, for W = 2, 4, 8, 16, 64, 256; gradient all-reduce: ring,
     2 (W-1)/W x trainable parameters x 4 bytes (fp32);
   - measured: W gloo processes (W = 2, 4, 8) run CML/CCL/CWCL/SDCL/CE at the real channel
     counts and embedding width (IN outputs 64/256/512 channels, embeddings 256-d, 4 images per
     rank, all 19 classes present) on a smaller crop (--bytes-crop: the bytes do not depend on the
     image size) and read dist.comm_stats(); the mean over ranks is compared with the computed
     figure. Synchronized BN (a model collective, not a loss one) is listed, computed only.
2. Step time of 2 and 4 processes (gloo, DDP + SyncBatchNorm2d, SGD) with the "image" scopes
   against the "global" scopes, at a CPU-feasible size, plus the global scopes at a budget of 750
   CWCL keys (as many per anchor as the image scope) to split the difference into the global
   machinery and the key budget's compute; the configurations alternate within each round so
   that machine noise hits all alike; per step the slowest rank counts.

Goals: loss collectives < 2% of the gradient all-reduce at every W; the W=8 share no more than
1.25x the W=2 share; global scopes cost < 5% step time against image scopes on 2 and 4 processes.

    .venv/bin/python bench/comm.py [--worlds-bytes 2,4,8] [--bytes-crop 256]
        [--worlds-speed 2,4] [--backbone resnet18] [--crop 128] [--batch 2] [--steps 5]
        [--cwcl-global-keys 750] [--skip-speed] [--profile]

Prints tables and writes bench/results/comm.json; --profile also writes comm_profile_<W>.txt beside
it: one more global-scope and image-scope step of rank 0 under torch.profiler (top operators, the
objective's labelled loss ranges, and where the difference goes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blindseg_dist import atomic, dist, losses
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.launcher import run_gloo
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights
from blindseg_dist.model.syncbn import convert_sync_batchnorm

SCOPES = {
    "image": LossWeights(ce_scope="exact", covariance_scope="image", contrastive_scope="image"),
    "global": LossWeights(ce_scope="exact", covariance_scope="batch", contrastive_scope="global"),
}
# R50 at crop 768: channels of the three IN outputs, embedding width; CWCL keys per image, SDCL K
CROP, BATCH = 768, 4
IN_CHANNELS = (64, 256, 512)
EMB_LEVELS, D = 3, 256
CWCL_M, SDCL_K = 15 * 50, 20
LOSS_TAGS = ("cml", "ccl", "cwcl", "sdcl", "seg")
WORLDS_COMPUTED = (2, 4, 8, 16, 64, 256)


# ----------------------------------------------------------------------------- synthetic data

def synthetic_labels(b: int, crop: int, gen: torch.Generator, classes: int = 19) -> torch.Tensor:
    """Blocky labels (blocks of crop/24 px, all 19 classes present), an ignore strip, and class 0
    filling the lower half (so that CWCL has an eligible class even on a small crop's coarsest level)."""
    blk = max(crop // 24, 1)
    coarse = torch.randint(0, classes, (b, -(-crop // blk), -(-crop // blk)), generator=gen)
    coarse.view(b, -1)[:, :classes] = torch.arange(classes)  # every class in every image
    label = coarse.repeat_interleave(blk, 1).repeat_interleave(blk, 2)[:, :crop, :crop].clone()
    label[:, : crop // 16] = IGNORE
    label[:, crop // 2:] = 0
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


def _ar(world: int) -> float:
    return 2 * (world - 1) / world


def computed_received(world: int, keys: int, classes=19, batch: int = BATCH,
                      negatives: str = "reference", bn: tuple[int, int] | None = None) -> dict[str, float]:
    """Bytes one rank receives per step (mean over ranks), dist.py's wire model, the code's protocol.

    CWCL and SDCL: the rows a rank does not own come in (on average (W-1)/W of the chosen ones);
    the metadata gathers grow with W by a few int64 per image of the global batch."""
    f4, i8, w = 4, 8, world
    out = {}
    tri = sum(c * (c + 1) // 2 for c in IN_CHANNELS) * f4  # upper triangle of S - S_a, 3 points
    out["cml"] = _ar(w) * (tri + i8)  # one all-reduce, no backward; + the image count
    out["ccl"] = _ar(w) * (sum(IN_CHANNELS) * f4 + i8)
    g = min(keys, w * batch * CWCL_M)
    cols = D + (1 if negatives == "paper" else 0)
    per_level = (_ar(w) * i8 if negatives == "reference" else 0)  # eligibility count
    per_level += (w - 1) * i8 + (w - 1) * batch * i8  # sizes, seeds
    per_level += (w - 1) / w * g * cols * f4  # the chosen keys
    out["cwcl"] = EMB_LEVELS * per_level
    per_class = [classes] * EMB_LEVELS if isinstance(classes, int) else list(classes)
    out["sdcl"] = sum(_ar(w) * (513 * i8) + (w - 1) * i8 + (w - 1) * batch * (2 + c) * i8
                      + 2 * (w - 1) / w * c * SDCL_K * D * f4  # negatives forward + gradient back
                      for c in per_class)
    out["seg"] = 3 * _ar(w) * i8  # ce, aux, ce_aug valid-pixel counts
    if bn is not None:
        ch, n_bn = bn
        out["syncbn"] = _ar(w) * 2 * 2 * (2 * ch + n_bn) * f4  # 2 views x (fwd + bwd)
    return out


def _bytes_worker(rank: int, world: int, crop: int, keys: int) -> dict:
    """Every loss with the global scopes at the real widths on a `crop` image, per tag."""
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(rank)
    out = {t: {"sent": 0, "received": 0} for t in LOSS_TAGS}

    def add():
        for tag, c in dist.comm_stats().items():
            out[tag]["sent"] += c["sent"]
            out[tag]["received"] += c["received"]
        dist.reset_comm_stats()

    sides = (crop // 2, crop // 4, crop // 8)
    feats = [torch.randn(BATCH, c, s, s, generator=g) for c, s in zip(IN_CHANNELS, sides)]
    feats_aug = [(f + 0.3 * torch.randn(f.shape, generator=g)).requires_grad_() for f in feats]
    dist.reset_comm_stats()
    for fn in (losses.covariance_matching_loss, losses.cross_covariance_loss):
        fn(feats, feats_aug, scope="batch").backward()
        add()
    label = synthetic_labels(BATCH, crop, g)
    logits = torch.randn(BATCH, 19, crop // 4, crop // 4, generator=g, requires_grad=True)
    small = F.interpolate(label[:, None].float(), size=(crop // 4,) * 2, mode="nearest")[:, 0].long()
    for _ in range(3):  # ce, aux, ce_aug
        losses.segmentation_loss(logits, small, scope="exact").backward()
    add()
    pred = _flip(small.clamp(max=18), 0.3, g)
    pred_aug = _flip(pred, 0.5, g)
    gidx = torch.arange(rank * BATCH, (rank + 1) * BATCH)
    classes = []
    for j, s in enumerate((crop // 16, crop // 4, crop // 4)):
        emb = F.normalize(torch.randn(BATCH, D, s, s, generator=g), dim=1)
        emb_aug = F.normalize(emb + 0.5 * torch.randn(emb.shape, generator=g), dim=1).requires_grad_()
        losses.class_wise_contrastive_loss(emb_aug, emb, label, pred, scope="global", global_keys=keys,
                                           seeds=losses.sample_seeds(1, j, gidx)).backward()
        add()
        emb_aug.grad = None
        loss, det = losses.semantic_disentanglement_loss(
            emb_aug, emb, label, pred, pred_aug, scope="global",
            seeds=losses.sample_seeds(2, j, gidx), return_details=True)
        loss.backward()
        add()
        classes.append(int(det["groups"].numel()))
    return {"bytes": out, "sdcl_classes": classes}


# ----------------------------------------------------------------------------- 2. step time

ATTRIBUTION = f"global_keys{CWCL_M}"


def _speed_variants(keys: int) -> dict[str, LossWeights]:
    """image scopes; global scopes at the key budget; and, to split the difference, global scopes
    with a budget of CWCL_M keys: as many CWCL logits per anchor as the image scope, so that
    global_keys750 - image is the cost of the global machinery (metadata, row exchange, batch
    covariance) and global - global_keys750 the cost of scoring every anchor against `keys` keys."""
    out = {name: dataclasses.replace(w, cwcl_global_keys=keys) for name, w in SCOPES.items()}
    out[ATTRIBUTION] = dataclasses.replace(SCOPES["global"], cwcl_global_keys=CWCL_M)
    return out


def _speed_worker(rank: int, world: int, backbone: str, crop: int, batch: int, steps: int,
                  warmup: int, keys: int, profile: bool = False) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(rank)
    data = {"image": torch.randn(batch, 3, crop, crop, generator=g),
            "image_aug": torch.randn(batch, 3, crop, crop, generator=g),
            "label": synthetic_labels(batch, crop, g)}
    runs = {}
    for name, w in _speed_variants(keys).items():
        torch.manual_seed(0)
        net = build_model(backbone)
        if world > 1:
            net = convert_sync_batchnorm(net)
        obj = BlindNetObjective(net, w, run_seed=1).train()
        mod = DDP(obj) if world > 1 else obj
        opt = torch.optim.SGD(obj.parameters(), lr=1e-3, momentum=0.9)
        runs[name] = (mod, opt)
    times = {name: [] for name in runs}
    comm = {}
    gidx = torch.arange(rank * batch, (rank + 1) * batch)

    def step(name: str, i: int) -> float:
        mod, opt = runs[name]
        dist.barrier()
        dist.reset_comm_stats()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = mod(data["image"], data["label"], data["image_aug"], step=i, global_index=gidx)
        out["total"].backward()
        opt.step()
        return time.perf_counter() - t

    for i in range(warmup + steps):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            dt = step(name, i)
            if i >= warmup:
                times[name].append(dt)
                comm[name] = dist.comm_stats()
    prof = {}
    if profile:  # one more step of the global and the image scopes; rank 0 records it
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        for name in ("global", "image"):
            if rank == 0:
                with profiler(activities=[ProfilerActivity.CPU]) as p:
                    step(name, warmup + steps)
                prof[name] = [(e.key, e.self_cpu_time_total, e.cpu_time_total, e.count) for e in p.key_averages()]
            else:
                step(name, warmup + steps)
    return {"times": times, "comm": comm, "profile": prof}


# ----------------------------------------------------------------------------- main

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds-bytes", default="2,4,8", help="gloo worlds for the measured bytes")
    ap.add_argument("--bytes-crop", type=int, default=256, help="crop of the measured bytes runs")
    ap.add_argument("--cwcl-global-keys", type=int, default=LossWeights().cwcl_global_keys,
                    help="the global CWCL key budget (default: loss.cwcl_global_keys' default)")
    ap.add_argument("--worlds-speed", default="2,4")
    ap.add_argument("--backbone", default="resnet18", help="for the step-time part")
    ap.add_argument("--crop", type=int, default=128, help="for the step-time part")
    ap.add_argument("--batch", type=int, default=2, help="images per process, step-time part")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more global-scope and image-scope step on rank 0 of each speed world: "
                         "bench/results/comm_profile_<W>.txt (top operators, labelled loss ranges, difference)")
    ap.add_argument("--out", default="bench/results/comm.json")
    args = ap.parse_args()
    keys = args.cwcl_global_keys

    # ---- 1. bytes
    params = trainable_parameters()
    grad_bytes = params * 4
    bn = bn_channels_per_view()
    print(f"1. bytes RECEIVED per step and rank: ResNet-50 BlindNet, crop {CROP}, {BATCH} images/GPU, scopes "
          f"covariance=batch, contrastive=global (cwcl_global_keys={keys}), ce=exact; "
          f"{params / 1e6:.2f}M trainable parameters -> gradient all-reduce payload {grad_bytes / 1e6:.1f} MB "
          f"(fp32), received 2 (W-1)/W x payload")
    computed = {}
    for w in WORLDS_COMPUTED:
        c = computed_received(w, keys, bn=bn)
        loss = sum(c[t] for t in LOSS_TAGS)
        grad = _ar(w) * grad_bytes
        computed[w] = {"per_tag": c, "loss_total": loss, "grad_allreduce": grad, "pct": 100 * loss / grad}
    measured = {}
    for w in _ints(args.worlds_bytes):
        t0 = time.perf_counter()
        res = run_gloo(_bytes_worker, w, args.bytes_crop, keys, timeout=1800, collective_timeout_s=600)
        per_tag = {t: statistics.mean(r["bytes"][t]["received"] for r in res) for t in LOSS_TAGS}
        classes = res[0]["sdcl_classes"]
        comp = computed_received(w, keys, classes=classes)
        measured[w] = {"per_tag_mean_over_ranks": per_tag, "per_rank": [r["bytes"] for r in res],
                       "sdcl_classes": classes, "computed_same_classes": comp,
                       "loss_total": sum(per_tag.values()), "seconds": time.perf_counter() - t0}
    hdr = f"{'W':>5}" + "".join(f"{t + ' MB':>10}" for t in LOSS_TAGS) + \
        f"{'loss MB':>10}{'grad MB':>10}{'loss %':>9}{'syncbn MB':>11}{'measured loss MB':>18}"
    print(hdr)
    for w, c in computed.items():
        m = measured.get(w)
        meas = f"{m['loss_total'] / 1e6:>18.3f}" if m else f"{'-':>18}"
        print(f"{w:>5}" + "".join(f"{c['per_tag'][t] / 1e6:>10.3f}" for t in LOSS_TAGS)
              + f"{c['loss_total'] / 1e6:>10.3f}{c['grad_allreduce'] / 1e6:>10.1f}{c['pct']:>8.2f}%"
              f"{c['per_tag']['syncbn'] / 1e6:>11.3f}" + meas)
    for w, m in measured.items():
        comp = m["computed_same_classes"]
        dev = {t: m["per_tag_mean_over_ranks"][t] - comp[t] for t in LOSS_TAGS}
        print(f"measured W={w} (crop {args.bytes_crop}, mean over ranks) - computed, bytes: "
              + ", ".join(f"{t} {v:+.0f}" for t, v in dev.items()) + f"  [{m['seconds']:.0f} s]")
    pct = {w: c["pct"] for w, c in computed.items()}
    goal_2pct = all(p < 2.0 for p in pct.values())
    growth = pct[8] / pct[2]
    goal_growth = growth <= 1.25
    abs_growth = computed[8]["loss_total"] / computed[2]["loss_total"]
    # the largest key budget that keeps every W under 2%
    best = 0
    for k in range(250, 6001, 250):
        if all(100 * sum(computed_received(w, k)[t] for t in LOSS_TAGS) / (_ar(w) * grad_bytes) < 2.0
               for w in WORLDS_COMPUTED):
            best = k
    print(f"goal: loss collectives < 2% of the gradient all-reduce at every W: {'PASS' if goal_2pct else 'FAIL'} "
          f"(max {max(pct.values()):.2f}%; cwcl_global_keys <= {best} meets it); W=8 share <= 1.25x W=2 share: "
          f"{'PASS' if goal_growth else 'FAIL'} ({growth:.3f}x; absolute bytes {abs_growth:.3f}x, "
          f"the gradient all-reduce's own ring factor grows 1.75x)")
    result = {"bytes": {
        "config": {"backbone": "resnet50", "crop": CROP, "images_per_gpu": BATCH, "covariance_scope": "batch",
                   "contrastive_scope": "global", "ce_scope": "exact", "cwcl_global_keys": keys,
                   "measured_with": f"gloo, dist.comm_stats(), crop {args.bytes_crop}, real widths"},
        "trainable_parameters": params, "grad_allreduce_payload_bytes": grad_bytes,
        "computed_received": {str(w): c for w, c in computed.items()},
        "measured_received": {str(w): m for w, m in measured.items()},
        "pct_of_grad_by_W": {str(w): p for w, p in pct.items()},
        "w8_over_w2_share": growth, "w8_over_w2_absolute": abs_growth,
        "largest_cwcl_global_keys_under_2pct": best,
        "goals": {"loss < 2% of grad at every W": goal_2pct, "W8 share <= 1.25 x W2 share": goal_growth}}}

    # ---- 2. step time
    if not args.skip_speed:
        speed = {}
        for world in _ints(args.worlds_speed):
            res = run_gloo(_speed_worker, world, args.backbone, args.crop, args.batch, args.steps,
                           args.warmup, keys, args.profile, timeout=3000, collective_timeout_s=600)
            if args.profile:
                from step_overhead import _profile_text  # bench/ is this script's folder

                ptxt = Path(args.out).with_name(f"comm_profile_{world}.txt")
                atomic.write_text(ptxt, f"{args.backbone}, crop {args.crop}, {args.batch} images/process, {world} "
                                        f"processes, rank 0, cwcl_global_keys={keys}\n\n"
                                  + _profile_text(res[0]["profile"], names=("global", "image")))
                print(f"wrote {ptxt}")
            names = list(res[0]["times"])
            per_step = {n: [max(r["times"][n][i] for r in res) for i in range(args.steps)] for n in names}
            med = {n: statistics.median(v) for n, v in per_step.items()}
            best_t = {n: min(v) for n, v in per_step.items()}
            # per round ratios (the variants alternate inside a round), then their median
            ratio = {n: statistics.median(g / i for g, i in zip(per_step[n], per_step["image"]))
                     for n in names if n != "image"}
            speed[world] = {"median_step_s": med, "min_step_s": best_t, "all_step_s": per_step,
                            "global_over_image": ratio["global"],
                            "global_keys750_over_image": ratio[ATTRIBUTION],
                            "global_over_image_of_medians": med["global"] / med["image"],
                            "global_over_image_min": best_t["global"] / best_t["image"],
                            "comm_rank0": res[0]["comm"]}
            if args.profile:
                speed[world]["profile"] = str(Path(args.out).with_name(f"comm_profile_{world}.txt"))
        print(f"\n2. step time (both views + backward + SGD), {args.backbone}, crop {args.crop}, {args.batch} "
              f"images/process, 1 thread/process, gloo, median of {args.steps} alternating rounds after "
              f"{args.warmup} warm-up (slowest rank per step), shared 2-core machine")
        print(f"{'processes':<11}{'image s':>9}{'global s':>10}{'global/image':>14}{ATTRIBUTION + ' s':>20}"
              f"{ATTRIBUTION + '/image':>24}{'min image s':>13}{'min global s':>14}")
        for world, s in speed.items():
            m, b = s["median_step_s"], s["min_step_s"]
            print(f"{world:<11}{m['image']:>9.3f}{m['global']:>10.3f}{s['global_over_image']:>14.3f}"
                  f"{m[ATTRIBUTION]:>20.3f}{s['global_keys750_over_image']:>24.3f}"
                  f"{b['image']:>13.3f}{b['global']:>14.3f}")
        print(f"(ratios: median over rounds of the per-round ratio; {ATTRIBUTION}: the global scopes with "
              f"cwcl_global_keys={CWCL_M}, as many CWCL keys per anchor as the image scope)")
        goal_time = all(s["global_over_image"] < 1.05 for s in speed.values())
        print(f"goal: global scopes cost < 5% step time against image scopes: {'PASS' if goal_time else 'FAIL'} ("
              + ", ".join(f"{w} processes {100 * (s['global_over_image'] - 1):+.1f}%" for w, s in speed.items())
              + ")")
        result["step_time"] = {"backbone": args.backbone, "crop": args.crop, "images_per_process": args.batch,
                               "steps": args.steps, "warmup": args.warmup, "threads_per_process": 1,
                               "cwcl_global_keys": keys, "attribution_variant": ATTRIBUTION,
                               "by_processes": {str(k): v for k, v in speed.items()},
                               "goal": "global_over_image < 1.05 on every world", "pass": goal_time}
    atomic.write_json(args.out, result, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
