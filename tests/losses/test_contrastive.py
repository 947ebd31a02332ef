"""CWCL / SDCL rules (docs/METHOD.md, "Losses") and naive per-anchor loops, single process, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blindseg_dist.losses.contrastive import _fold_seeds, _quotas
from blindseg_dist.losses import (class_wise_contrastive_loss, sample_class_anchors,
                                  sample_seeds, semantic_disentanglement_loss)

TAU = 0.07


def _emb(b, d, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, d, h, w, generator=g, dtype=dtype), dim=1)
    emb_aug = F.normalize(emb + 0.7 * torch.randn(b, d, h, w, generator=g, dtype=dtype), dim=1)
    return emb_aug.requires_grad_(), emb.requires_grad_()


def _layout(counts, hw=(32, 32), seed=0):
    """One (1, H, W) label map with `counts` pixels per class id, the rest 255, shuffled."""
    h, w = hw
    flat = torch.full((h * w,), 255, dtype=torch.long)
    vals = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in counts.items()])
    flat[: vals.numel()] = vals
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    return flat[perm].view(1, h, w)


def _sample(labels, pred=None, **kw):
    pred = labels.clone() if pred is None else pred
    return sample_class_anchors(labels, pred, seeds=sample_seeds(1, 0, range(labels.shape[0])),
                                **kw)


def _slot_ids(ids, per_class=50):
    return ids.view(ids.shape[0], -1, per_class)[:, :, 0]  # (B, K) class id of each slot


# ----------------------------------------------------------------------------- CWCL sampler

def test_cwcl_class_needs_more_than_50_pixels():
    labels = _layout({3: 50, 5: 51})
    idx, ids = _sample(labels)
    slots = _slot_ids(ids)[0].tolist()
    assert slots[0] == 5 and 3 not in slots
    assert slots[1:] == [256 + s for s in range(1, 15)]
    assert (labels.flatten()[idx[0, :50]] == 5).all()


def test_cwcl_ascending_ids_at_most_15():
    labels = _layout({c: 60 for c in (15, 3, 0, 7, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14)})
    _, ids = _sample(labels)
    assert _slot_ids(ids)[0].tolist() == list(range(15))  # 15 dropped, no filler


def test_cwcl_hard_easy_split_with_fill_in():
    # class 0: 30 hard + 40 easy -> 25/25; class 1: 10 hard -> 10/40; class 2: 5 easy -> 45/5
    labels = _layout({0: 70, 1: 70, 2: 65})
    flat = labels.flatten()
    pred = flat.clone()
    for c, n_hard in ((0, 30), (1, 10), (2, 60)):
        pix = torch.nonzero(flat == c).flatten()[:n_hard]
        pred[pix] = 9  # wrong prediction -> hard
    idx, ids = _sample(labels, pred.view_as(labels))
    for slot, want_hard in enumerate((25, 10, 45)):
        s = idx[0, slot * 50:(slot + 1) * 50]
        assert (flat[s] == slot).all() and s.unique().numel() == 50  # no replacement
        assert int((pred[s] != slot).sum()) == want_hard


def test_cwcl_filler_groups_are_pseudo_classes_and_disjoint():
    labels = _layout({4: 100, 8: 200})
    idx, ids = _sample(labels)
    assert idx.shape == (1, 750) and ids.shape == (1, 750)
    assert _slot_ids(ids)[0].tolist() == [4, 8] + [256 + s for s in range(2, 15)]
    assert idx[0, 100:].unique().numel() == 650  # 13 filler groups, disjoint random pixels


def test_cwcl_no_class_image_and_tiny_image():
    idx, ids = _sample(torch.full((1, 32, 32), 255))
    assert _slot_ids(ids)[0].tolist() == [256 + s for s in range(15)]
    assert idx.unique().numel() == 750
    # 10x10 = 100 pixels < 700 filler slots: drawn with replacement, still 15 x 50
    labels = _layout({2: 60}, hw=(10, 10))
    idx, ids = _sample(labels)
    assert idx.shape == (1, 750) and int(idx.max()) < 100
    assert _slot_ids(ids)[0].tolist() == [2] + [256 + s for s in range(1, 15)]


def test_cwcl_sampling_reproducible_and_split_independent():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (4, 16, 16), generator=g)
    pred = torch.randint(0, 4, (4, 16, 16), generator=g)
    seeds = sample_seeds(304, 12, range(4))
    kw = dict(max_classes=3, pixels_per_class=20)
    a = sample_class_anchors(labels, pred, seeds=seeds, **kw)
    b = sample_class_anchors(labels, pred, seeds=seeds, **kw)
    halves = [sample_class_anchors(labels[s], pred[s], seeds=seeds[s], **kw)
              for s in (slice(0, 1), slice(1, 4))]
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[0], torch.cat([h[0] for h in halves]))
    c = sample_class_anchors(labels, pred, seeds=sample_seeds(304, 13, range(4)), **kw)
    assert not torch.equal(a[0], c[0])
    g1 = sample_class_anchors(labels, pred, generator=torch.Generator().manual_seed(5), **kw)
    g2 = sample_class_anchors(labels, pred, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(g1[0], g2[0])


def test_sample_seeds_deterministic_int63():
    s = sample_seeds(304, 7, [0, 1, 2, 3])
    assert s.dtype == torch.int64 and (s >= 0).all() and s.unique().numel() == 4
    assert torch.equal(s[2:], sample_seeds(304, 7, [2, 3]))
    assert not torch.equal(s, sample_seeds(305, 7, [0, 1, 2, 3]))


# ----------------------------------------------------------------------------- CWCL loss

def naive_cwcl(emb_aug, emb, idx, ids, negatives, scope, tau=TAU):
    b, d = emb_aug.shape[:2]
    za, z = emb_aug.flatten(2), emb.detach().flatten(2)  # (B, D, N)
    # global class identity: real ids are shared, a pseudo-class belongs to its image
    cls = [[(int(c),) if c < 256 else (i, int(c)) for c in ids[i]] for i in range(b)]
    terms = []
    for i in range(b):
        pool = [(j, k) for j in (range(b) if scope == "global" else [i])
                for k in range(idx.shape[1])]
        for a in range(idx.shape[1]):
            anchor = za[i, :, idx[i, a]]
            logits = [anchor @ z[i, :, idx[i, a]]]
            for j, k in pool:
                if negatives == "paper" and cls[j][k] == cls[i][a]:
                    continue
                logits.append(anchor @ z[j, :, idx[j, k]])
            terms.append(-torch.log_softmax(torch.stack(logits) / tau, 0)[0])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("negatives", ["reference", "paper"])
@pytest.mark.parametrize("scope", ["image", "global"])
def test_cwcl_matches_naive_loop(negatives, scope):
    emb_aug, emb = _emb(2, 5, 12, 12, seed=1)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (2, 12, 12), generator=g)
    labels[1, :6] = 255
    pred = torch.randint(0, 4, (2, 12, 12), generator=g)
    seeds = sample_seeds(1, 2, [0, 1])
    kw = dict(max_classes=5, pixels_per_class=12)
    got = class_wise_contrastive_loss(emb_aug, emb, labels, pred, negatives=negatives,
                                      scope=scope, seeds=seeds, **kw)
    idx, ids = sample_class_anchors(labels, pred, seeds=seeds, **kw)
    want = naive_cwcl(emb_aug, emb, idx, ids, negatives, scope)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, emb_aug)[0]
    g_want = torch.autograd.grad(want, emb_aug)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_cwcl_default_sizes_750_anchors_reference_negatives():
    emb_aug, emb = _emb(1, 4, 32, 32, seed=2)
    labels = _layout({1: 300, 6: 200, 9: 51})
    pred = torch.where(torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.5,
                       labels, torch.zeros_like(labels))
    seeds = sample_seeds(0, 0, [0])
    got = class_wise_contrastive_loss(emb_aug, emb, labels, pred, seeds=seeds)
    idx, ids = sample_class_anchors(labels, pred, seeds=seeds)
    za, z = emb_aug.flatten(2)[0][:, idx[0]].T, emb.detach().flatten(2)[0][:, idx[0]].T
    pos = (za * z).sum(1)  # the positive also sits among the 750 negatives (inert mask)
    logits = torch.cat([pos[:, None], za @ z.T], 1) / TAU  # (750, 751)
    want = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cwcl_keys_and_positives_are_detached():
    emb_aug, emb = _emb(2, 4, 12, 12, seed=3)
    labels = torch.randint(0, 3, (2, 12, 12), generator=torch.Generator().manual_seed(0))
    class_wise_contrastive_loss(emb_aug, emb, labels, labels, max_classes=3,
                                pixels_per_class=10, seeds=[1, 2]).backward()
    assert emb.grad is not None and emb.grad.abs().max() == 0  # connected, zero
    assert emb_aug.grad.abs().max() > 0


def test_cwcl_labels_at_full_resolution_are_nearest_resized():
    emb_aug, emb = _emb(1, 4, 8, 8, seed=4)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (1, 32, 32), generator=g)
    pred = torch.randint(0, 3, (1, 32, 32), generator=g)
    small = [F.interpolate(t[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
             for t in (labels, pred)]
    kw = dict(max_classes=3, pixels_per_class=8, seeds=[9])
    torch.testing.assert_close(class_wise_contrastive_loss(emb_aug, emb, labels, pred, **kw),
                               class_wise_contrastive_loss(emb_aug, emb, *small, **kw))


# ----------------------------------------------------------------------------- SDCL

def naive_sdcl(emb_aug, emb, y, p, pa, seeds, scope, k, cap_per_image, tau=TAU):
    """Loops over pixels; randomness from the documented per-image draws (neg, anchor keys).
    "global": how many anchors / negatives each image gives comes from the batch-seeded
    quota draw (_quotas); which ones, from the image's own keys (smallest first)."""
    b, d, h, w = emb_aug.shape
    n = h * w
    y, p, pa = y.flatten(1), p.flatten(1), pa.flatten(1)
    keys = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        keys.append((torch.rand(n, generator=g, dtype=torch.float64),
                     torch.rand(n, generator=g, dtype=torch.float64)))
    za, z = emb_aug.flatten(2), emb.detach().flatten(2)

    def gt_count(i, c):
        imgs = range(b) if scope == "global" else [i]
        return sum(int((y[j] == c).sum()) for j in imgs)

    anchors = []
    for i in range(b):
        for q in range(n):
            corr = y[i, q] != 255 and p[i, q] == y[i, q] and pa[i, q] != p[i, q]
            if corr and gt_count(i, int(pa[i, q])) >= k:
                anchors.append((float(keys[i][1][q]), i, q, int(pa[i, q])))
    if scope == "global":  # budgeted draws (docs/DISTRIBUTED.md, "Budgeted global scopes")
        seed = _fold_seeds(torch.as_tensor(seeds, dtype=torch.int64))
        quota = _quotas([sum(a[1] == i for a in anchors) for i in range(b)], cap_per_image * b,
                        seed, 1)
        anchors = [a for i in range(b) for a in sorted(x for x in anchors if x[1] == i)[:quota[i]]]
        pools = {}
        for c in sorted({a[3] for a in anchors}):
            qc = _quotas([int((y[j] == c).sum()) for j in range(b)], k, seed, 2 + c)
            pools[c] = [t for j in range(b) for t in sorted(
                (float(keys[j][0][r]), j, r) for r in range(n) if y[j, r] == c)[:qc[j]]]
    else:
        anchors = sorted(anchors)[: cap_per_image * b]
    terms = []
    for _, i, q, c in anchors:
        if scope == "global":
            pool = pools[c]
        else:
            pool = sorted((float(keys[i][0][r]), i, r) for r in range(n) if y[i, r] == c)[:k]
        a = za[i, :, q]
        logits = [a @ z[i, :, q]] + [a @ za[j, :, r] for _, j, r in pool]
        terms.append(-torch.log_softmax(torch.stack(logits) / tau, 0)[0])
    return torch.stack(terms).mean() if terms else None, anchors


def _sdcl_batch(seed, b=3, hw=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (b, hw, hw), generator=g)
    y[0, 0] = 255
    p = torch.where(torch.rand(y.shape, generator=g) < 0.7, y.clamp(max=classes - 1),
                    torch.randint(0, classes, y.shape, generator=g))
    pa = torch.where(torch.rand(y.shape, generator=g) < 0.5, p,
                     torch.randint(0, classes, y.shape, generator=g))
    return y, p, pa


@pytest.mark.parametrize("scope", ["image", "global"])
@pytest.mark.parametrize("cap", [1000, 4])
def test_sdcl_matches_naive_loop(scope, cap):
    y, p, pa = _sdcl_batch(0)
    emb_aug, emb = _emb(3, 4, 8, 8, seed=5)
    seeds = sample_seeds(11, 3, range(3))
    got, det = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, scope=scope,
                                             num_negatives=12, max_anchors_per_image=cap,
                                             seeds=seeds, return_details=True)
    want, anchors = naive_sdcl(emb_aug, emb, y, p, pa, seeds, scope, 12, cap)
    assert det["num_anchors_global"] == len(anchors) > 0
    assert sorted(zip(det["anchors"][0].tolist(), det["anchors"][1].tolist())) == \
        sorted((i, q) for _, i, q, _ in anchors)
    if cap == 4:
        assert len(anchors) == 4 * 3  # the cap binds
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, emb_aug)[0]
    g_want = torch.autograd.grad(want, emb_aug)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_sdcl_global_draws_negatives_from_the_whole_batch():
    y, p, pa = _sdcl_batch(1)
    emb_aug, emb = _emb(3, 4, 8, 8, seed=6)
    # 30 negatives: no image has 30 pixels of a class (64 px / 4 classes), the batch has
    img = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, scope="image",
                                        num_negatives=30, seeds=[1, 2, 3], return_details=True)
    glb = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, scope="global",
                                        num_negatives=30, seeds=[1, 2, 3], return_details=True)
    assert img[1]["num_anchors_global"] == 0 and float(img[0].detach()) == 0.0
    assert glb[1]["num_anchors_global"] > 0
    cand = glb[1]["candidates"]  # flat (image * N + pixel) indices
    for row, c in zip(glb[1]["negatives"], glb[1]["groups"]):
        pix = cand[row]
        assert (y.flatten()[pix] == c).all() and pix.unique().numel() == 30
        assert (pix // 64).unique().numel() > 1  # drawn from several images


def test_sdcl_correction_map_and_skip_rules():
    # one 8x8 image, original prediction right everywhere: class 0 has 19 GT pixels,
    # class 1 has 20, class 2 the rest (25); class 7 is absent from the ground truth
    y = torch.tensor([0] * 19 + [1] * 20 + [2] * 25).view(1, 8, 8)
    p = y.clone()
    pa = y.clone()
    pa[0, 5, 0:2] = 0  # class-2 pixels predicted 0 by the aug view: 19 GT px of 0 -> skipped
    pa[0, 5, 2:5] = 1  # predicted 1: 20 GT px -> anchors
    pa[0, 5, 5:7] = 7  # predicted 7: absent from GT -> skipped
    p[0, 6, 0] = 3  # original wrong here (M = 0) although aug differs
    pa[0, 6, 0] = 1
    pa[0, 6, 1] = 1  # aug differs, original right -> anchor
    emb_aug, emb = _emb(1, 4, 8, 8, seed=7)
    loss, det = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, seeds=[5],
                                              return_details=True)
    anchors = sorted(det["anchors"][1].tolist())
    assert anchors == [5 * 8 + 2, 5 * 8 + 3, 5 * 8 + 4, 6 * 8 + 1]
    assert det["groups"].tolist() == [1]
    neg = det["negatives"]
    assert neg.shape == (1, 20) and (y.flatten()[neg[0]] == 1).all()  # all 20 GT-1 pixels
    loss.backward()
    g = emb_aug.grad.flatten(2)[0].abs().sum(0)
    assert (g[neg[0]] > 0).all()  # the 20 shared negatives receive gradient
    assert (g[[5 * 8 + 0, 5 * 8 + 5]] == 0).all()  # skipped pixels do not


def test_sdcl_zero_anchors_is_a_connected_zero():
    y, p, _ = _sdcl_batch(2)
    emb_aug, emb = _emb(3, 4, 8, 8, seed=8)
    for scope in ("image", "global"):
        loss = semantic_disentanglement_loss(emb_aug, emb, y, p, p.clone(), scope=scope,
                                             seeds=[1, 2, 3])
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        ga, ge = torch.autograd.grad(loss, [emb_aug, emb])
        assert ga.abs().max() == 0 and ge.abs().max() == 0


def test_sdcl_reproducible_from_seeds_and_generator():
    y, p, pa = _sdcl_batch(3)
    emb_aug, emb = _emb(3, 4, 8, 8, seed=9)
    kw = dict(num_negatives=5, max_anchors_per_image=3)
    a = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, seeds=[4, 5, 6], **kw)
    b = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, seeds=[4, 5, 6], **kw)
    c = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, seeds=[4, 5, 7], **kw)
    assert a.item() == b.item() != c.item()
    g = [semantic_disentanglement_loss(emb_aug, emb, y, p, pa, **kw,
                                       generator=torch.Generator().manual_seed(1))
         for _ in range(2)]
    assert g[0].item() == g[1].item()


# ----------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("which", ["cwcl_image", "cwcl_global", "sdcl_image", "sdcl_global"])
def test_bf16_autocast_keeps_float32_math(which):
    y, p, pa = _sdcl_batch(4)
    emb_aug, emb = _emb(3, 4, 8, 8, seed=10, dtype=torch.float32)
    name, scope = which.split("_")
    if name == "cwcl":
        def run():
            return class_wise_contrastive_loss(emb_aug, emb, y, p, scope=scope, max_classes=3,
                                               pixels_per_class=8, seeds=[1, 2, 3])
    else:
        def run():
            return semantic_disentanglement_loss(emb_aug, emb, y, p, pa, scope=scope,
                                                 num_negatives=5, seeds=[1, 2, 3])
    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert got.dtype == torch.float32 and want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    emb_aug, emb = _emb(1, 4, 8, 8, seed=11)
    y = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="negatives"):
        class_wise_contrastive_loss(emb_aug, emb, y, y, negatives="all")
    with pytest.raises(ValueError, match="scope"):
        semantic_disentanglement_loss(emb_aug, emb, y, y, y, scope="batch")
    with pytest.raises(ValueError, match="seeds"):
        class_wise_contrastive_loss(emb_aug, emb, y, y, seeds=[1, 2])
    with pytest.raises(ValueError, match="outside"):
        class_wise_contrastive_loss(emb_aug, emb, y + 300, y)


@pytest.mark.parametrize("repeats", [False, True])  # True: the objective's sorted union, repeats kept
@pytest.mark.parametrize("scope", ["image", "global"])
def test_pixel_rows_give_the_dense_map_values_and_gradients(scope, repeats):
    """PixelRows (the embeddings only at the plan's pixels, what the sparse heads pass) give the
    dense map's loss, and the dense map's gradient at those pixels (it is zero elsewhere)."""
    from blindseg_dist.losses import PixelRows, cwcl_pixels, cwcl_plan, sdcl_pixels, sdcl_plan

    b, d, h, w = 2, 8, 24, 24
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[:, :3] = 255
    pred = labels.clone()
    pred_aug = torch.where(torch.rand(b, h, w, generator=g) < 0.3,
                           torch.randint(0, 4, (b, h, w), generator=g), labels)
    seeds = sample_seeds(5, 2, range(b))
    cw = cwcl_plan(labels, pred, (h, w), pixels_per_class=10, seeds=seeds)
    sd = sdcl_plan(labels, pred, pred_aug, (h, w), scope=scope, num_negatives=5, seeds=seeds)
    read = torch.cat([cwcl_pixels(cw, h * w), sdcl_pixels(sd)])
    pix = torch.sort(read).values if repeats else torch.unique(read)
    assert 0 < torch.unique(pix).numel() < b * h * w  # sparse: some pixels are never read
    assert (pix.numel() > torch.unique(pix).numel()) == repeats

    def losses(emb_aug, emb):
        return (class_wise_contrastive_loss(emb_aug, emb, labels, pred, scope=scope, tau=TAU,
                                            pixels_per_class=10, seeds=seeds, plan=cw),
                semantic_disentanglement_loss(emb_aug, emb, labels, pred, pred_aug, scope=scope,
                                              num_negatives=5, tau=TAU, seeds=seeds, plan=sd))

    emb_aug, emb = _emb(b, d, h, w, seed=4)
    dense = losses(emb_aug, emb.detach())
    (g_dense,) = torch.autograd.grad(sum(dense), emb_aug)
    g_dense = g_dense.permute(0, 2, 3, 1).reshape(-1, d)
    rows_a = emb_aug.detach().permute(0, 2, 3, 1).reshape(-1, d)[pix].requires_grad_()
    rows = emb.detach().permute(0, 2, 3, 1).reshape(-1, d)[pix]
    sparse = losses(PixelRows(rows_a, pix, (b, d, h, w)), PixelRows(rows, pix, (b, d, h, w)))
    (g_rows,) = torch.autograd.grad(sum(sparse), rows_a)
    for s_val, d_val in zip(sparse, dense):
        assert d_val > 0
        torch.testing.assert_close(s_val, d_val, rtol=1e-12, atol=1e-14)
    g_pix = torch.zeros(b * h * w, d, dtype=g_rows.dtype).index_add_(0, pix, g_rows)  # a repeat's rows summed
    torch.testing.assert_close(g_pix[pix], g_dense[pix], rtol=1e-10, atol=1e-14)
    unread = torch.ones(b * h * w, dtype=torch.bool)
    unread[pix] = False
    assert g_dense[unread].abs().max() == 0  # the pixels PixelRows leaves out carry no gradient
    with pytest.raises(ValueError, match="PixelRows"):
        PixelRows(rows_a, pix[:-1], (b, d, h, w))


@pytest.mark.parametrize("d", [4, 64])  # 64 > groups: the (A, G*K) product; 4: the gathered banks
def test_sdcl_image_loss_matches_naive_loop_in_both_products(d):
    y, p, pa = _sdcl_batch(4, hw=16, classes=5)
    emb_aug, emb = _emb(3, d, 16, 16, seed=12)
    seeds = sample_seeds(2, 7, range(3))
    got = semantic_disentanglement_loss(emb_aug, emb, y, p, pa, scope="image", num_negatives=10,
                                        max_anchors_per_image=20, seeds=seeds)
    want, anchors = naive_sdcl(emb_aug, emb, y, p, pa, seeds, "image", 10, 20)
    assert len(anchors) == 60  # the cap binds
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, emb_aug)[0], torch.autograd.grad(want, emb_aug)[0],
                               rtol=1e-9, atol=1e-12)


def test_sdcl_image_plans_of_every_level_at_once_equal_the_per_level_plans():
    from blindseg_dist.losses import sdcl_image_plans, sdcl_plan

    y, p, pa = _sdcl_batch(5, hw=32, classes=4)
    sizes = [(16, 16), (8, 8), (4, 4)]
    seeds = [sample_seeds(9, 1, range(3)) + j for j in range(3)]
    kw = dict(num_negatives=6, max_anchors_per_image=15)
    together = sdcl_image_plans(y, p, pa, sizes, seeds=seeds, **kw)
    for j, size in enumerate(sizes):
        alone = sdcl_plan(y, p, pa, size, scope="image", seeds=seeds[j], **kw)
        assert together[j]["num_anchors_global"] == alone["num_anchors_global"]
        for key in ("anchor_class", "groups", "negatives"):
            assert torch.equal(together[j][key], alone[key]), key
        assert all(torch.equal(a, b) for a, b in zip(together[j]["anchors"], alone["anchors"]))
    assert together[0]["num_anchors_global"] == 45  # the cap binds at the finest level
    bad = y.clone()
    bad[1, 2, 3] = 300
    with pytest.raises(ValueError, match=r"labels holds ids outside \[0, 255\] \(min 0, max 300\)"):
        sdcl_image_plans(bad, p, pa, sizes, seeds=seeds, **kw)


def test_sdcl_image_plans_without_nonzero_static_take_the_same_pixels(monkeypatch):
    """PyTorch before 2.6 has no CUDA kernel for nonzero_static: the stable-sort fallback picks the same
    anchors and groups."""
    from blindseg_dist.losses import sdcl_image_plans

    y, p, pa = _sdcl_batch(6, hw=16, classes=4)
    kw = dict(num_negatives=6, max_anchors_per_image=10, seeds=[sample_seeds(3, 2, range(3))])
    want = sdcl_image_plans(y, p, pa, [(16, 16)], **kw)[0]

    def missing(*a, **k):
        raise NotImplementedError("Could not run 'aten::nonzero_static' with arguments from the 'CUDA' backend")

    monkeypatch.setattr(torch, "nonzero_static", missing)
    got = sdcl_image_plans(y, p, pa, [(16, 16)], **kw)[0]
    assert want["anchors"][0].numel() > 0 and want["groups"].numel() > 0
    for key in ("anchor_class", "groups", "negatives"):
        assert torch.equal(got[key], want[key]), key
    assert all(torch.equal(a, b) for a, b in zip(got["anchors"], want["anchors"]))
