"""The two-view objective: sampling first and running the projection heads only at the sampled
pixels gives exactly the dense computation (values and every parameter gradient)."""
import copy

import pytest
import torch

from blindseg_dist.model import build_model
from blindseg_dist.model.objective import BlindNetObjective, LossWeights


def _inputs(net, b=2, size=64):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)
    image_aug = image + 0.5 * torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        net.eval()
        label = net(image).argmax(1)  # the network's own prediction: SDCL finds corrected pixels
        net.train()
    flip = torch.rand(label.shape, generator=g) < 0.2
    label[flip] = torch.randint(0, 19, label.shape, generator=g)[flip]
    label[:, :4] = 255
    return image, image_aug, label


@pytest.mark.parametrize("scope", ["image", "global"])
@pytest.mark.parametrize("negatives", ["reference", "paper"])
def test_sparse_heads_equal_dense_heads(scope, negatives):
    torch.manual_seed(0)
    net = build_model("resnet18").double()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0  # dropout masks would differ between the two runs
    image, image_aug, label = _inputs(net)
    w = LossWeights(contrastive_scope=scope, cwcl_negatives=negatives)
    results = []
    for sparse in (False, True):
        obj = BlindNetObjective(copy.deepcopy(net), w, run_seed=7, sparse_heads=sparse).train()
        out = obj(image, label, image_aug, step=3, global_index=torch.tensor([5, 6]))
        out["total"].backward()
        grads = {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}
        results.append((out, grads, dict(obj.named_parameters())))
    (dense, g_dense, params), (sparse, g_sparse, _) = results
    for k in ("cwcl", "sdcl"):
        assert dense["terms"][k] > 0
        torch.testing.assert_close(sparse["terms"][k], dense["terms"][k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse["total"], dense["total"], rtol=1e-10, atol=1e-12)
    assert set(g_sparse) == set(g_dense) == {n for n, p in params.items() if p.requires_grad}
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], rtol=1e-8, atol=1e-12, msg=n)


def test_aug_view_skips_the_aux_head():
    net = build_model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert net(x)["aux"] is not None and net(x, with_aux=False)["aux"] is None
    out = net(x, dense_embeds=False)
    assert out["embeds"] is None and [t.shape[1] for t in out["proj_inputs"]] == [512, 304, 256]
    rows = out["proj_inputs"][1].permute(0, 2, 3, 1).reshape(-1, 304)[:7]
    dense = net(x)["embeds"][1].permute(0, 2, 3, 1).reshape(-1, 256)[:7]
    torch.testing.assert_close(net.embed_rows(1, rows), dense)
