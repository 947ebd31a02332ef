"""A full BlindNet training step under DDP + SyncBatchNorm2d equals one process on the
concatenated batch (docs/DISTRIBUTED.md, "The contract"), on real gloo processes.

Global batch of 4 images at 64x64, ResNet-18 BlindNet (aux + projection heads), float64,
all four BlindNet losses on, CE scope "exact". W=2 runs 2+2 images, W=3 runs 2+1+1.
Per rank: build the same initial weights, convert BN to SyncBatchNorm2d, wrap the
BlindNetObjective in DistributedDataParallel (gloo, default bucketing and buffer broadcast),
one forward (both views) + backward with per-image seeds from the global indices. Checked
against a single process with plain BatchNorm2d on all 4 images (computed in the parent):

  a. DDP-averaged parameter gradients on every rank == 1-process gradients, and
     mean over ranks of the total loss (and of every term) == 1-process loss, rtol 1e-6,
     for the scopes (covariance "batch", contrastive "global") and ("image", "image");
  b. BN running statistics after the step == the 1-process ones, where each view's global
     batch statistics were used separately, and != a run that concatenates the two views;
  c. SyncBatchNorm2d alone, uneven per-rank batches ([3, 1]; [1, 3, 2] and [2, 0, 3] with
     an empty rank): outputs, input / affine gradients, running statistics (momentum 0.1
     and None) and the eval output match plain BatchNorm2d on the concatenated batch, in
     float64 (rtol 1e-6) and float32 (rtol 1e-4).

Dropout: the aux head's Dropout2d draws a mask per rank, which cannot match the 1-process
mask, so the test sets every Dropout2d's p to 0 (training code keeps p=0.1).
Reference gradients (~18.5M float64 values per scope) go to the workers through a file in
a temporary directory and are compared inside the workers, so only small summaries travel
back. One spawn per world size runs every check.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from blindseg_dist.launcher import run_gloo
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights
from blindseg_dist.model.syncbn import SyncBatchNorm2d, convert_sync_batchnorm

SPLITS = {2: [2, 2], 3: [2, 1, 1]}
BN_SPLITS = {2: [[3, 1]], 3: [[1, 3, 2], [2, 0, 3]]}
RUN_SEED, STEP, CROP = 304, 11, 64
RTOL = 1e-6
CONFIGS = {
    "batch_global": LossWeights(ce_scope="exact", covariance_scope="batch",
                                contrastive_scope="global"),
    "image_image": LossWeights(ce_scope="exact", covariance_scope="image",
                               contrastive_scope="image"),
}
LOSS_TAGS = ("seg", "cml", "ccl", "cwcl", "sdcl", "syncbn")


# ----------------------------------------------------------------------------- data / model

def make_net() -> nn.Module:
    """ResNet-18 BlindNet, float64, Dropout2d off (see module docstring)."""
    torch.manual_seed(0)
    net = build_model("resnet18").double()
    for m in net.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0
    return net.train()


@functools.cache
def make_batch() -> dict[str, torch.Tensor]:
    """4 images, their augmented views and labels that exercise every loss.

    Labels = the initial network's own prediction with 20% of the pixels re-drawn, so the
    original prediction is often right (SDCL needs pred == label), and a strip of ignore.
    """
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, CROP, CROP, generator=g, dtype=torch.float64)
    image_aug = 0.6 * image + 0.8 * torch.randn(image.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pred = make_net()(image)["logits"].argmax(1)
    noise = torch.randint(0, 19, pred.shape, generator=g)
    label = torch.where(torch.rand(pred.shape, generator=g) < 0.2, noise, pred)
    label[0, :6] = 255
    return {"image": image, "image_aug": image_aug, "label": label}


def _step(obj, batch, lo, hi):
    out = obj(batch["image"][lo:hi], batch["label"][lo:hi], batch["image_aug"][lo:hi],
              step=STEP, global_index=torch.arange(lo, hi))
    out["total"].backward()
    return float(out["total"].detach()), {k: float(v.detach()) for k, v in out["terms"].items()}


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()
            if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _violation(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """max |got - want| / (atol + rtol |want|): <= 1 means assert_allclose would pass."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float(((got - want).abs() / (atol + rtol * want.abs())).max()) if want.numel() else 0.0


def _atol(ref) -> float:
    # entries that cancel to ~0 in a tensor of scale s carry round-off of ~eps * s
    ref = torch.as_tensor(ref)
    scale = 1e-10 if ref.dtype == torch.float64 else 1e-5
    return scale * float(ref.double().abs().max()) + 1e-300


# ----------------------------------------------------------------------------- references

def _reference(name: str) -> dict:
    net = make_net()
    obj = BlindNetObjective(net, CONFIGS[name], run_seed=RUN_SEED).train()
    total, terms = _step(obj, make_batch(), 0, 4)
    grads = {n: p.grad.detach().clone() for n, p in obj.named_parameters()}
    return {"total": total, "terms": terms, "grads": grads, "buffers": _bn_buffers(obj)}


def _concat_views_buffers() -> dict[str, torch.Tensor]:
    """Running statistics if both views went through the network as one batch of 8."""
    obj = BlindNetObjective(make_net(), CONFIGS["batch_global"])
    b = make_batch()
    with torch.no_grad():
        obj.net(torch.cat([b["image"], b["image_aug"]]))
    return _bn_buffers(obj)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    refs = {name: _reference(name) for name in CONFIGS}
    concat = _concat_views_buffers()
    path = tmp_path_factory.mktemp("ddp_ref") / "reference.pt"
    torch.save({"refs": {n: {"grads": r["grads"], "buffers": r["buffers"]}
                         for n, r in refs.items()}, "concat": concat, "batch": make_batch()},
               path)
    yield {"refs": refs, "concat": concat, "path": str(path)}
    path.unlink()  # ~300 MB; pytest keeps the last few temporary directories


# ----------------------------------------------------------------------------- workers

def _ddp_case(rank: int, world: int, name: str, ref: dict, concat: dict, batch: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from blindseg_dist import dist

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    net = convert_sync_batchnorm(make_net())
    assert any(isinstance(m, SyncBatchNorm2d) for m in net.modules())
    obj = BlindNetObjective(net, CONFIGS[name], run_seed=RUN_SEED).train()
    ddp = DDP(obj)  # CPU / gloo: no device_ids; find_unused_parameters=False (all used)
    dist.reset_comm_stats()
    total, terms = _step(ddp, batch, lo, hi)
    comm = dist.comm_stats()
    missing = [n for n, p in obj.named_parameters() if p.grad is None]
    # atol from the largest gradient of the network: the BN biases right before an IN layer
    # (layer1/2 last block) have a true gradient of 0 (IN removes a per-channel shift), so
    # both runs hold round-off of ~1e-16 there, which no relative tolerance can compare
    atol = 1e-12 * max(float(g.abs().max()) for g in ref["grads"].values())
    grad_viol = {n: _violation(p.grad, ref["grads"][n], RTOL, atol)
                 for n, p in obj.named_parameters() if p.grad is not None}
    grad_err = {n: (float((p.grad - ref["grads"][n]).abs().max()), float(ref["grads"][n].abs().max()))
                for n, p in obj.named_parameters() if p.grad is not None}
    bufs = _bn_buffers(obj)
    buf_viol = {n: _violation(b, ref["buffers"][n], RTOL, _atol(ref["buffers"][n]))
                for n, b in bufs.items()}
    # how far from the concatenated-views statistics (must be clearly nonzero)
    concat_diff = max(float((bufs[n].double() - concat[n].double()).abs().max()
                            / concat[n].double().abs().max().clamp_min(1e-12))
                      for n in bufs if n.endswith("running_var"))
    return {"total": total, "terms": terms, "missing_grads": missing, "grad_viol": grad_viol,
            "grad_err": grad_err,
            "buf_viol": buf_viol, "concat_diff": concat_diff, "comm": comm,
            "nbt": sorted({int(b) for n, b in bufs.items()
                           if n.endswith("num_batches_tracked") and "aux_head" not in n}),
            "nbt_aux": sorted({int(b) for n, b in bufs.items()
                               if n.endswith("num_batches_tracked") and "aux_head" in n})}


def _bn_data(total: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = 5
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {  # channel means away from 0 (offsets up to 3): checks the variance formula
        "x1": (mk(total, c, 3, 4) * 1.5 + torch.linspace(-3, 3, c)[:, None, None]).to(dtype),
        "x2": (mk(total, c, 3, 4) * 0.7 + 1.0).to(dtype),
        "r1": mk(total, c, 3, 4).to(dtype), "r2": mk(total, c, 3, 4).to(dtype),
        "w": (1 + 0.3 * mk(c)).to(dtype), "b": (0.2 * mk(c)).to(dtype),
    }


def _bn_run(bn: nn.BatchNorm2d, d: dict, lo: int, hi: int) -> dict:
    """Two training forwards, one backward of sum(y1 r1) + sum(y2 r2), then an eval forward."""
    with torch.no_grad():
        bn.weight.copy_(d["w"])
        bn.bias.copy_(d["b"])
    x1 = d["x1"][lo:hi].clone().requires_grad_()
    x2 = d["x2"][lo:hi].clone().requires_grad_()
    bn.train()
    y1, y2 = bn(x1), bn(x2)
    ((y1 * d["r1"][lo:hi]).sum() + (y2 * d["r2"][lo:hi]).sum()).backward()
    bn.eval()
    with torch.no_grad():
        y_eval = bn(d["x1"][lo:hi])
    return {"y1": y1.detach(), "y2": y2.detach(), "y_eval": y_eval, "gx1": x1.grad,
            "gx2": x2.grad, "gw": bn.weight.grad, "gb": bn.bias.grad,
            "mean": bn.running_mean.clone(), "var": bn.running_var.clone(),
            "nbt": int(bn.num_batches_tracked)}


def _bn_cases(split: list[int]):
    for dtype in (torch.float64, torch.float32):
        for momentum in (0.1, None):
            yield dtype, momentum


def _syncbn_worker_case(rank: int, split: list[int]) -> list[dict]:
    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    out = []
    for k, (dtype, momentum) in enumerate(_bn_cases(split)):
        d = _bn_data(sum(split), dtype, seed=k)
        bn = SyncBatchNorm2d(5, momentum=momentum).to(dtype)
        out.append(_bn_run(bn, d, lo, hi))
    return out


def _worker(rank: int, world: int, ref_path: str) -> dict:
    blob = torch.load(ref_path, mmap=True, weights_only=True)
    out = {"ddp": {name: _ddp_case(rank, world, name, blob["refs"][name], blob["concat"],
                                   blob["batch"])  # the parent's batch, bit for bit
                   for name in CONFIGS}}
    out["syncbn"] = [_syncbn_worker_case(rank, split) for split in BN_SPLITS[world]]
    return _plain(out)


def _plain(obj):
    """Tensors -> numpy: torch's queue would share tensor storage with the exiting worker."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


@functools.cache
def _results(world: int, ref_path: str) -> list[dict]:
    return run_gloo(_worker, world, ref_path, timeout=240)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_step_matches_single_process(references, world, name):
    ref = references["refs"][name]
    per_rank = _results(world, references["path"])
    # every loss really ran and contributes (a vacuous term would prove nothing)
    for term in ("ce", "ce_aug", "aux", "cml", "ccl", "cwcl", "sdcl"):
        assert ref["terms"][term] > 0, f"reference {name}: term {term} is {ref['terms'][term]}"
    totals = [r["ddp"][name]["total"] for r in per_rank]
    assert np.mean(totals) == pytest.approx(ref["total"], rel=RTOL)
    for term, want in ref["terms"].items():
        got = np.mean([r["ddp"][name]["terms"][term] for r in per_rank])
        assert got == pytest.approx(want, rel=RTOL), f"{name}: mean over ranks of {term}"
    for rank, r in enumerate(per_rank):
        res = r["ddp"][name]
        assert res["missing_grads"] == [], f"rank {rank}: parameters without gradient"
        assert set(res["grad_viol"]) == set(ref["grads"])
        bad = {n: v for n, v in res["grad_viol"].items() if not v <= 1.0}
        worst = max(res["grad_viol"].items(), key=lambda kv: kv[1])
        assert not bad, (f"{name}, W={world}, rank {rank}: {len(bad)} parameter gradients "
                         f"differ from the 1-process run beyond rtol {RTOL} "
                         f"(worst {worst[0]}: {worst[1]:.3g} x the tolerance)")
        # every loss collective ran and was counted
        assert all(res["comm"].get(tag, {}).get("received", 0) > 0 for tag in LOSS_TAGS), res["comm"]


@pytest.mark.parametrize("world", [2, 3])
def test_views_keep_separate_bn_statistics(references, world):
    per_rank = _results(world, references["path"])
    for name in CONFIGS:
        ref_bufs = references["refs"][name]["buffers"]
        # the check can tell the two behaviours apart
        diff = max(float((ref_bufs[n] - references["concat"][n]).abs().max())
                   for n in ref_bufs if n.endswith("running_var"))
        assert diff > 1e-3
        for rank, r in enumerate(per_rank):
            res = r["ddp"][name]
            assert res["nbt"] == [2], "each BN layer must see two batches (one per view)"
            assert res["nbt_aux"] == [1], "the aux head runs on the original view only"
            bad = {n: v for n, v in res["buf_viol"].items() if not v <= 1.0}
            assert not bad, f"{name}, W={world}, rank {rank}: running stats differ: {bad}"
            assert res["concat_diff"] > 1e-3, "running stats look like concatenated views"


@pytest.mark.parametrize("world", [2, 3])
def test_syncbn_matches_batchnorm_on_concatenated_batch(references, world):
    per_rank = _results(world, references["path"])
    for s, split in enumerate(BN_SPLITS[world]):
        for k, (dtype, momentum) in enumerate(_bn_cases(split)):
            rtol = RTOL if dtype == torch.float64 else 1e-4
            d = _bn_data(sum(split), dtype, seed=k)
            want = _bn_run(nn.BatchNorm2d(5, momentum=momentum).to(dtype), d, 0, sum(split))
            got = [r["syncbn"][s][k] for r in per_rank]
            where = f"split {split}, {dtype}, momentum {momentum}"
            for key in ("y1", "y2", "y_eval", "gx1", "gx2"):
                cat = torch.cat([torch.as_tensor(g[key]) for g in got])
                assert _violation(cat, want[key], rtol, _atol(want[key])) <= 1, f"{key}, {where}"
            for key in ("gw", "gb"):  # each rank holds its share; DDP would sum (and / W)
                tot = sum(torch.as_tensor(g[key]).double() for g in got)
                assert _violation(tot, want[key], rtol, _atol(want[key])) <= 1, f"{key}, {where}"
            for rank, g in enumerate(got):
                assert g["nbt"] == want["nbt"] == 2
                for key in ("mean", "var"):
                    assert _violation(g[key], want[key], rtol, _atol(want[key])) <= 1, (
                        f"running {key}, rank {rank}, {where}")
