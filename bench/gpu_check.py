"""GPU readiness check: one run on one CUDA GPU, one JSON, one table (docs/BENCHMARKS.md, "On a GPU").

    bench/gpu_check.sh [--out bench/results/gpu_check.json]      # one CUDA GPU, < 8 min
    bench/gpu_check.sh --cpu-smoke [--out PATH]                  # the same code on the CPU, tiny sizes, < 2 min

Sections (each timed; CUDA timings synchronize before reading the clock):
1. correctness: every loss (CE, CML, CCL, CWCL, SDCL, image and global scopes) and one training
   objective step of the model, values and gradients on the device against the CPU (float32, TF32
   off for the comparison), within rtol 1e-4 (losses) / 1e-3 (model);
2. training throughput and peak memory: fp32 against bf16 autocast + channels_last (R50, crop 768,
   4 images; forward of both views, backward, SGD step);
3. step overhead: BlindNet step / two-view CE step / single-view step (R50, crop 512, 2 images,
   alternating rounds after a warm-up), as bench/step_overhead.py measures it;
4. evaluation images/s at 1024x2048 with sliding windows (768 crop, 512 stride, bf16 on CUDA);
5. loader samples/s with N workers (synthetic GTA5-sized frames written as shards first) against
   the images/s the GPU consumes at the step rate of section 2;
6. host synchronisations of one training step per loss, image scope, with and without CWCL's
   loader plans: counted by bench/host_syncs.py's rules (on the CPU, whatever the device) and, on
   CUDA, the synchronising calls torch reports under torch.cuda.set_sync_debug_mode("warn");
7. torch.compile (run.compile): graph breaks of the network (torch._dynamo.explain) and the step
   time eager against compiled (inductor on CUDA; aot_eager in the CPU smoke, where inductor's C++
   compilation alone takes minutes), as bench/compile_step.py measures it.
Exit status 1 when a correctness check fails (the JSON is written first).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blindseg_dist import atomic, losses
from blindseg_dist.data.labels import IGNORE
from blindseg_dist.engine.evaluate import make_predictor
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights

PROFILES = {
    "gpu": dict(device="cuda", backbone="resnet50", crop=768, batch=4, steps=6, warmup=2,
                check_backbone="resnet18", check_crop=128, overhead_crop=512, overhead_batch=2,
                overhead_rounds=5, eval_hw=(1024, 2048), eval_window=[768, 512], eval_images=3,
                frame_hw=(1052, 1914), frames=24, loader_workers=[2, 4, 8], loader_batches=12,
                compile_backend="inductor", compile_crop=512, compile_steps=5),
    "cpu-smoke": dict(device="cpu", backbone="resnet18", crop=32, batch=2, steps=1, warmup=0,
                      check_backbone="resnet18", check_crop=32, overhead_crop=32, overhead_batch=2,
                      overhead_rounds=1, eval_hw=(48, 80), eval_window=[32, 32], eval_images=1,
                      frame_hw=(96, 160), frames=4, loader_workers=[0], loader_batches=2,
                      compile_backend="aot_eager", compile_crop=32, compile_steps=1),
}
BLINDNET = LossWeights()
TWO_VIEW_CE = LossWeights(cml=0, ccl=0, cwcl=0, sdcl=0)
SINGLE_VIEW = LossWeights(two_view=False, cml=0, ccl=0, cwcl=0, sdcl=0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def _no_tf32():
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def synthetic_batch(b: int, crop: int, seed: int = 0, classes: int = 19) -> dict:
    """Two random views and blocky labels (every class present at 768 px, an ignore strip)."""
    g = torch.Generator().manual_seed(seed)
    blk = max(crop // 24, 2)
    coarse = torch.randint(0, classes, (b, -(-crop // blk), -(-crop // blk)), generator=g)
    label = coarse.repeat_interleave(blk, 1).repeat_interleave(blk, 2)[:, :crop, :crop].contiguous()
    label[:, : max(crop // 32, 1)] = IGNORE
    return {"image": torch.randn(b, 3, crop, crop, generator=g),
            "image_aug": torch.randn(b, 3, crop, crop, generator=g), "label": label}


# ----------------------------------------------------------------------------- 1. correctness

def _loss_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d, h, w = 2, 16, 24, 24
    y = torch.randint(0, 6, (b, h, w), generator=g)
    y[0, :3] = IGNORE
    pred = torch.where(torch.rand(y.shape, generator=g) < 0.7, y, torch.randint(0, 6, y.shape, generator=g))
    pred_aug = torch.where(torch.rand(y.shape, generator=g) < 0.5, pred,
                           torch.randint(0, 6, y.shape, generator=g))
    emb = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)
    return {"emb": emb, "emb_aug": F.normalize(emb + 0.5 * torch.randn(emb.shape, generator=g), dim=1),
            "labels": y, "pred": pred, "pred_aug": pred_aug,
            "f": [torch.randn(b, c, s, s, generator=g) for c, s in ((8, 16), (16, 8))],
            "fa": [torch.randn(b, c, s, s, generator=g) for c, s in ((8, 16), (16, 8))],
            "logits": torch.randn(b, 6, h, w, generator=g)}


def _loss_cases():
    seeds = losses.sample_seeds(304, 7, torch.arange(2))

    def cwcl(t, scope, neg):
        return losses.class_wise_contrastive_loss(t["emb_aug"], t["emb"], t["labels"], t["pred"], scope=scope,
                                                  negatives=neg, max_classes=4, pixels_per_class=20,
                                                  global_keys=300, seeds=seeds)

    def sdcl(t, scope):
        return losses.semantic_disentanglement_loss(t["emb_aug"], t["emb"], t["labels"], t["pred"],
                                                    t["pred_aug"], scope=scope, num_negatives=10,
                                                    max_anchors_per_image=40, seeds=seeds)
    return {
        "ce_exact": (lambda t: losses.segmentation_loss(t["logits"], t["labels"], scope="exact"), ["logits"]),
        "cml_image": (lambda t: losses.covariance_matching_loss(t["f"], t["fa"], scope="image"), ["fa"]),
        "cml_batch": (lambda t: losses.covariance_matching_loss(t["f"], t["fa"], scope="batch"), ["fa"]),
        "ccl_image": (lambda t: losses.cross_covariance_loss(t["f"], t["fa"], scope="image"), ["fa"]),
        "ccl_batch": (lambda t: losses.cross_covariance_loss(t["f"], t["fa"], scope="batch"), ["fa"]),
        "cwcl_image": (lambda t: cwcl(t, "image", "reference"), ["emb_aug"]),
        "cwcl_global_paper": (lambda t: cwcl(t, "global", "paper"), ["emb_aug"]),
        "sdcl_image": (lambda t: sdcl(t, "image"), ["emb_aug"]),
        "sdcl_global": (lambda t: sdcl(t, "global"), ["emb_aug"]),
    }


def _run_loss(fn, leaves, dev):
    t = _loss_inputs()
    moved = {}
    for k, v in t.items():
        vs = v if isinstance(v, list) else [v]
        vs = [x.to(dev).requires_grad_(k in leaves) if x.is_floating_point() else x.to(dev) for x in vs]
        moved[k] = vs if isinstance(v, list) else vs[0]
    loss = fn(moved)
    params = [x for k in leaves for x in (moved[k] if isinstance(moved[k], list) else [moved[k]])]
    grads = torch.autograd.grad(loss, params)
    return loss.detach().cpu(), [g.cpu() for g in grads]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> float:
    """Largest |a - b| relative to max |b| (0 when equal)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-12) if a.numel() else 0.0


def check_correctness(prof: dict, dev: torch.device) -> dict:
    out = {}
    with _no_tf32():
        for name, (fn, leaves) in _loss_cases().items():
            (lc, gc), (ld, gd) = _run_loss(fn, leaves, torch.device("cpu")), _run_loss(fn, leaves, dev)
            err = max([_close(ld.view(1), lc.view(1), 1e-4)] + [_close(a, b, 1e-4) for a, b in zip(gd, gc)])
            out[name] = {"cpu": float(lc), "device": float(ld), "max_rel_err": err, "pass": err <= 1e-4}
        # one objective step of the model (train mode, BlindNet losses): total loss and gradients
        crop = prof["check_crop"]
        batch = synthetic_batch(2, crop, seed=1)
        res = {}
        for d in (torch.device("cpu"), dev):
            torch.manual_seed(0)
            obj = BlindNetObjective(build_model(prof["check_backbone"]), BLINDNET, run_seed=304).to(d).train()
            o = obj(batch["image"].to(d), batch["label"].to(d), batch["image_aug"].to(d), step=3)
            o["total"].backward()
            grads = torch.cat([p.grad.flatten().cpu() for p in obj.parameters() if p.grad is not None])
            res[d.type] = (float(o["total"].detach()), grads, {k: float(v.detach()) for k, v in o["terms"].items()})
        (tc, gc, terms_c), (td, gd, terms_d) = res["cpu"], res[dev.type]
        err = max(abs(td - tc) / max(abs(tc), 1e-12), _close(gd, gc, 1e-3))
        out["model_objective_step"] = {"cpu": tc, "device": td, "terms_cpu": terms_c, "terms_device": terms_d,
                                       "max_rel_err": err, "pass": err <= 1e-3}
    return out


# ----------------------------------------------------------------------------- 2./3. training steps

def _make_step(w: LossWeights, backbone: str, dev: torch.device, bf16: bool, channels_last: bool):
    torch.manual_seed(0)
    net = build_model(backbone, aux=w.aux > 0, proj_heads=w.two_view and (w.cwcl > 0 or w.sdcl > 0))
    obj = BlindNetObjective(net, w, run_seed=304).to(dev).train()
    if channels_last:
        obj = obj.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(obj.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(batch: dict, i: int) -> float:
        image, image_aug = batch["image"], batch["image_aug"]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
            image_aug = image_aug.contiguous(memory_format=torch.channels_last)
        _sync(dev)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            out = obj(image, batch["label"], image_aug if w.two_view else None, step=i)
        out["total"].backward()
        opt.step()
        _sync(dev)
        return time.perf_counter() - t

    return step


def _on(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def throughput(prof: dict, dev: torch.device) -> dict:
    batch = _on(synthetic_batch(prof["batch"], prof["crop"]), dev)
    out = {}
    for name, bf16, cl in (("fp32", False, False), ("bf16_channels_last", True, True)):
        step = _make_step(BLINDNET, prof["backbone"], dev, bf16, cl)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        for i in range(prof["warmup"]):
            step(batch, i)
        times = [step(batch, prof["warmup"] + i) for i in range(prof["steps"])]
        med = statistics.median(times)
        out[name] = {"median_step_s": med, "images_per_s": prof["batch"] / med, "all_step_s": times,
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(dev) / 2 ** 30
                                         if dev.type == "cuda" else None)}
        del step
    out["bf16_speedup"] = out["bf16_channels_last"]["images_per_s"] / out["fp32"]["images_per_s"]
    return out


def step_overhead(prof: dict, dev: torch.device, bf16: bool) -> dict:
    batch = _on(synthetic_batch(prof["overhead_batch"], prof["overhead_crop"]), dev)
    configs = {"blindnet": BLINDNET, "two_view_ce": TWO_VIEW_CE, "single_view": SINGLE_VIEW}
    steps = {n: _make_step(w, prof["backbone"], dev, bf16, bf16) for n, w in configs.items()}
    for n, s in steps.items():  # warm-up
        s(batch, 0)
    times = {n: [] for n in configs}
    for r in range(prof["overhead_rounds"]):
        order = list(configs) if r % 2 == 0 else list(configs)[::-1]
        for n in order:
            times[n].append(steps[n](batch, r + 1))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"median_step_s": med, "all_step_s": times, "precision": "bf16_channels_last" if bf16 else "fp32",
            "blindnet_over_two_view_ce": med["blindnet"] / med["two_view_ce"],
            "blindnet_over_single_view": med["blindnet"] / med["single_view"]}


# ----------------------------------------------------------------------------- 4. evaluation

@torch.no_grad()
def eval_speed(prof: dict, dev: torch.device, bf16: bool) -> dict:
    torch.manual_seed(0)
    net = build_model(prof["backbone"], aux=False, proj_heads=False).to(dev).eval()
    if bf16:
        net = net.to(memory_format=torch.channels_last)
    predict = make_predictor(prof["eval_window"])
    h, w = prof["eval_hw"]
    image = torch.randn(1, 3, h, w, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with amp:
        predict(net, image, (h, w))  # warm-up
        _sync(dev)
        t = time.perf_counter()
        for _ in range(prof["eval_images"]):
            pred = predict(net, image, (h, w)).argmax(1)
        _sync(dev)
    dt = time.perf_counter() - t
    return {"images_per_s": prof["eval_images"] / dt, "size": [h, w], "sliding_window": prof["eval_window"],
            "precision": "bf16_channels_last" if bf16 else "fp32", "pred_shape": list(pred.shape)}


# ----------------------------------------------------------------------------- 5. loader

def loader_speed(prof: dict, gpu_images_per_s: float) -> dict:
    from blindseg_dist.data import synth
    from blindseg_dist.data.shards import write_shards
    from blindseg_dist.data.sources import get_source
    from blindseg_dist.data.stream import make_train_loader

    out = {"frame_hw": list(prof["frame_hw"]), "crop": prof["crop"], "batch": prof["batch"],
           "gpu_images_per_s": gpu_images_per_s, "by_workers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(Path(tmp) / "raw", domains=1, images_per_domain=prof["frames"],
                       size=tuple(prof["frame_hw"]), seed=0, progress=False)
        source = get_source("gta5", str(Path(tmp) / "raw" / "gta5"))
        shards = Path(tmp) / "shards"
        n_shards = max(prof["loader_workers"] + [1])
        write_shards(source, shards, samples_per_shard=max(1, prof["frames"] // n_shards), progress=False,
                     min_shards=1)
        for nw in prof["loader_workers"]:
            loader = make_train_loader(str(shards), batch_size=prof["batch"], crop_size=prof["crop"],
                                       num_workers=nw, seed=0, pin_memory=prof["device"] == "cuda")
            it = iter(loader)
            next(it)  # worker start-up
            t = time.perf_counter()
            for _ in range(prof["loader_batches"]):
                next(it)
            sps = prof["loader_batches"] * prof["batch"] / (time.perf_counter() - t)
            out["by_workers"][str(nw)] = {"samples_per_s": sps, "vs_gpu": sps / gpu_images_per_s}
            del it, loader
    return out


# ----------------------------------------------------------------------------- 6. host syncs

def _cuda_syncs(prof: dict, dev: torch.device, plans: bool) -> int:
    """Synchronising CUDA calls of one objective forward + backward, as torch's sync debug mode reports."""
    import warnings

    from blindseg_dist.losses.plans import PLAN_KEY, LoaderPlanner
    from blindseg_dist.model.objective import projection_sizes

    torch.manual_seed(0)
    net = build_model(prof["check_backbone"])
    b, crop = 2, prof["check_crop"]
    planner = LoaderPlanner(304, projection_sizes(net, crop), b) if plans else None
    obj = BlindNetObjective(net, BLINDNET, run_seed=304).to(dev).train()
    cpu = synthetic_batch(b, crop)
    batch = _on(cpu, dev)

    def run(k: int):
        p = ([{n: t.to(dev) for n, t in lvl.items()} for lvl in planner({"label": cpu["label"]}, k)[PLAN_KEY]]
             if planner else None)
        _sync(dev)
        return p

    p = run(0)
    obj(batch["image"], batch["label"], batch["image_aug"], step=0, plans=p)["total"].backward()  # warm-up
    p = run(1)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obj(batch["image"], batch["label"], batch["image_aug"], step=1, plans=p)["total"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def host_syncs(prof: dict, dev: torch.device) -> dict:
    from host_syncs import count_step  # bench/ is this script's folder

    out = {}
    for name, plans in (("sampling_in_the_losses", False), ("loader_plans", True)):
        mode = count_step(LossWeights(), backbone=prof["check_backbone"], crop=max(prof["check_crop"], 64),
                          batch=2, plans=plans)
        units = {u: sum(c.values()) for u, c in sorted(mode.counts.items())}
        out[name] = {"by_unit": units, "total": sum(units.values())}
        if dev.type == "cuda":
            out[name]["cuda_sync_debug_reports"] = _cuda_syncs(prof, dev, plans)
    return out


# ----------------------------------------------------------------------------- 7. torch.compile

def compile_check(prof: dict, dev: torch.device) -> dict:
    from compile_step import graph_breaks, step_times  # bench/ is this script's folder

    breaks = graph_breaks(prof["check_backbone"], max(prof["check_crop"], 64), 2, objective=False)
    t = step_times(prof["compile_backend"], prof["check_backbone"], prof["compile_crop"], 2, prof["compile_steps"],
                   1, device=prof["device"])
    return {"backend": prof["compile_backend"], "graph_breaks": breaks,
            "graph_breaks_total": sum(v.get("graph_breaks", 0) for v in breaks.values()),
            "median_step_s": t["median_step_s"], "compiled_over_eager": t["compiled_over_eager"],
            "compile_s": t["compile_s"]}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI): the same code paths")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    args = ap.parse_args(argv)
    name = "cpu-smoke" if args.cpu_smoke else "gpu"
    prof = PROFILES[name]
    if prof["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "run `bench/gpu_check.sh --cpu-smoke` for the CPU smoke test", file=sys.stderr)
        return 2
    dev = torch.device(prof["device"])
    bf16 = dev.type == "cuda"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its kernels once
    t_all = time.perf_counter()
    result = {"profile": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "sizes": {k: v for k, v in prof.items()}, "seconds": {}}
    sections = (("correctness", lambda: check_correctness(prof, dev)),
                ("throughput", lambda: throughput(prof, dev)),
                ("step_overhead", lambda: step_overhead(prof, dev, bf16)),
                ("eval", lambda: eval_speed(prof, dev, bf16)),
                ("loader", lambda: loader_speed(prof, result["throughput"]["bf16_channels_last" if bf16 else "fp32"]
                                                ["images_per_s"])),
                ("host_syncs", lambda: host_syncs(prof, dev)),
                ("compile", lambda: compile_check(prof, dev)))
    for key, fn in sections:
        t = time.perf_counter()
        result[key] = fn()
        result["seconds"][key] = time.perf_counter() - t
        print(f"[gpu_check] {key}: {result['seconds'][key]:.1f} s", flush=True)
    result["seconds"]["total"] = time.perf_counter() - t_all
    ok = all(v["pass"] for v in result["correctness"].values())
    result["correctness_pass"] = ok
    atomic.write_json(args.out, result, indent=1)
    print_table(result)
    print(f"wrote {args.out}")
    return 0 if ok else 1


def print_table(r: dict) -> None:
    print(f"\nGPU check ({r['profile']}, {r['device']}, torch {r['torch']}, {r['seconds']['total']:.0f} s)")
    print(f"{'check':<34}{'value':>16}  note")
    for k, v in r["correctness"].items():
        print(f"{'correctness/' + k:<34}{v['max_rel_err']:>16.2e}  {'PASS' if v['pass'] else 'FAIL'} (max rel. error)")
    tp = r["throughput"]
    for k in ("fp32", "bf16_channels_last"):
        mem = tp[k]["peak_memory_gib"]
        print(f"{'train ' + k + ' images/s':<34}{tp[k]['images_per_s']:>16.2f}  peak "
              f"{'-' if mem is None else f'{mem:.2f} GiB'}")
    print(f"{'train bf16 speed-up':<34}{tp['bf16_speedup']:>16.2f}")
    so = r["step_overhead"]
    print(f"{'step blindnet / two-view CE':<34}{so['blindnet_over_two_view_ce']:>16.3f}  {so['precision']}")
    print(f"{'step blindnet / single view':<34}{so['blindnet_over_single_view']:>16.3f}")
    print(f"{'eval images/s':<34}{r['eval']['images_per_s']:>16.2f}  {r['eval']['size']} sliding "
          f"{r['eval']['sliding_window']}")
    for nw, v in r["loader"]["by_workers"].items():
        print(f"{'loader samples/s, ' + nw + ' workers':<34}{v['samples_per_s']:>16.2f}  x{v['vs_gpu']:.2f} of the "
              f"GPU's {r['loader']['gpu_images_per_s']:.1f} images/s")
    for k, v in r["host_syncs"].items():
        cuda = v.get("cuda_sync_debug_reports")
        units = ", ".join(f"{u} {n}" for u, n in v["by_unit"].items())
        print(f"{'host syncs/step, ' + k:<34}{v['total']:>16d}  {units}"
              + ("" if cuda is None else f"; CUDA sync debug reports {cuda}"))
    c = r["compile"]
    print(f"{'compile graph breaks (network)':<34}{c['graph_breaks_total']:>16d}  {c['backend']}")
    print(f"{'step compiled / eager':<34}{c['compiled_over_eager']:>16.3f}  compile ~{c['compile_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
