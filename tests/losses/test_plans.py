"""CWCL's sampling planned in the loader (losses/plans.py): on real loader batches, the plans finished
on the device draw exactly the anchors and keys that cwcl_plan draws for the same seeds; the objective
gives the same losses and gradients with and without them."""
from __future__ import annotations

import pytest
import torch

from blindseg_dist.data.stream import make_train_loader
from blindseg_dist.losses import cwcl_plan, sample_seeds, sdcl_plan
from blindseg_dist.losses.plans import (PLAN_KEY, SDCL_KEY, STEP_KEY, LoaderPlanner, cwcl_label_plan,
                                        cwcl_plan_from_loader, stream_seed)
from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights, projection_sizes

SEED, B, WORLD, RANK = 304, 2, 2, 1
SIZES = ((4, 4), (16, 16), (9, 13))  # coarse, level-like and odd (nearest resize), crop 64


def _pred(label: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A prediction at 1/4 resolution that is right at about half the pixels."""
    small = label[:, ::4, ::4].clamp(max=18)
    noise = torch.randint(0, 19, small.shape, generator=g)
    return torch.where(torch.rand(small.shape, generator=g) < 0.5, noise, small)


@pytest.mark.parametrize("workers,start", [(0, 0), (2, 3)])
def test_loader_plans_draw_what_cwcl_plan_draws(train_shards, workers, start):
    planner = LoaderPlanner(SEED, SIZES, B, rank=RANK, world=WORLD, per_class=20, sdcl_keys=True)
    loader = make_train_loader(train_shards, batch_size=B, crop_size=64, num_workers=workers, seed=SEED,
                               rank=RANK, world_size=WORLD, start_step=start, planner=planner)
    g = torch.Generator().manual_seed(0)
    it = iter(loader)
    classes = 0
    for k in range(start, start + 4):
        batch = next(it)
        assert int(batch[STEP_KEY]) == k  # the micro-batch index, whichever worker made it
        label = batch["label"]
        pred = _pred(label, g)
        gidx = k * B * WORLD + RANK * B + torch.arange(B)
        for j, size in enumerate(SIZES):
            want = cwcl_plan(label, pred, size, pixels_per_class=20,
                             seeds=sample_seeds(stream_seed(SEED, "cwcl", j), k, gidx))
            got = cwcl_plan_from_loader(batch[PLAN_KEY][j], pred, size, per_class=20)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, j)
            classes += int(batch[PLAN_KEY][j]["ncls"].sum())
            # SDCL: the loader's per-pixel keys give sdcl_plan's draws
            pred_aug = _pred(label, g)
            sd_seeds = sample_seeds(stream_seed(SEED, "sdcl", j), k, gidx)
            for scope in ("image", "global"):
                want = sdcl_plan(label, pred, pred_aug, size, scope=scope, num_negatives=3, seeds=sd_seeds)
                got = sdcl_plan(label, pred, pred_aug, size, scope=scope, num_negatives=3, seeds=sd_seeds,
                                keys=batch[SDCL_KEY][j])
                assert want.keys() == got.keys()
                for name, v in want.items():
                    vs, gs = (v, got[name]) if isinstance(v, tuple) else ((v,), (got[name],))
                    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                               for a, b in zip(vs, gs)), (k, j, scope, name)
    assert classes > 0  # real classes were sampled, not only filler groups


def test_label_plan_edge_cases_match():
    """No candidate class (filler only), every pixel ignore, and fewer pixels than filler slots
    (drawn with replacement), against cwcl_plan."""
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 19, (3, 6, 6), generator=g)
    label[1] = 255
    label[2] = 7
    pred = torch.randint(0, 19, (3, 6, 6), generator=g)
    seeds = sample_seeds(5, 2, torch.arange(3))
    for per_class in (2, 10, 40):  # 36 pixels: 40 x 15 filler slots need replacement
        want = cwcl_plan(label, pred, (6, 6), pixels_per_class=per_class, seeds=seeds)
        ys = label.flatten(1)
        plan = [cwcl_label_plan(ys[i], int(seeds[i]), per_class=per_class) for i in range(3)]
        plan = {n: torch.stack([q[n] for q in plan]) for n in plan[0]}
        got = cwcl_plan_from_loader(plan, pred, (6, 6), per_class=per_class)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), per_class


def test_objective_with_loader_plans_equals_without():
    torch.manual_seed(0)
    net = build_model("resnet18").double()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    sizes = projection_sizes(net, 64)
    obj = BlindNetObjective(net, LossWeights(), run_seed=SEED).train()
    g = torch.Generator().manual_seed(2)
    image = torch.randn(B, 3, 64, 64, generator=g, dtype=torch.float64)
    image_aug = image + 0.5 * torch.randn(image.shape, generator=g, dtype=torch.float64)
    # quadrants of 4 classes (64 pixels each at the 16 x 16 levels: eligible) and small blocks
    label = torch.randint(0, 19, (B, 2, 2), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2)
    label[:, :16, :16] = torch.randint(0, 19, (B, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    step = 5
    batch = LoaderPlanner(SEED, sizes, B, sdcl_keys=True)({"label": label}, step)
    results = []
    for plans, keys in ((None, None), (batch[PLAN_KEY], batch[SDCL_KEY])):
        obj.zero_grad()
        out = obj(image, label, image_aug, step=step, global_index=step * B + torch.arange(B), plans=plans,
                  sdcl_keys=keys)
        out["total"].backward()
        results.append((torch.stack([out["terms"]["cwcl"], out["terms"]["sdcl"]]).detach(),
                        [p.grad.clone() for p in obj.parameters() if p.grad is not None]))
    assert float(results[0][0][0]) > 0
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
