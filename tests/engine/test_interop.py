"""Checkpoint interop with the released BlindNet / RobustNet code.

The released code cannot run here (CUDA-only, its own repository), so the claim "with converted
weights our eval logits equal the released DeepV3Plus's" is tested against ``ReleasedDeepV3Plus``
below: a separate implementation, written for this test from the structure of the released
network as read in its network/deepv3.py and network/Resnet.py (module names, nesting, the D16
dilation rule, the order of the ASPP concat and of the decoder concat, the IN points), sharing no
code with blindseg_dist.model. Its state dict is the released key list with shapes; its eval
forward gives the logits the released network computes from the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from tests.engine._eval_fixtures import DEMO_CONFIG, make_shards
from blindseg_dist import cli
from blindseg_dist.config import load_config, model_kwargs, save_config
from blindseg_dist.engine import checkpoint as ckpt
from blindseg_dist.engine.interop import (InteropError, export_checkpoint, from_released, import_checkpoint,
                                          load_released_file, released_state_dict, to_released)
from blindseg_dist.model import build_model

REPO = Path(__file__).resolve().parents[2]


def _cbr(cin, cout, k=1, d=1, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=bias),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Head(nn.Module):  # ProjectionHead: .proj = 1x1 d->d, ReLU, 1x1 d->256
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(d, d, 1), nn.ReLU(), nn.Conv2d(d, 256, 1))


class _ASPP(nn.Module):  # .features (1x1 + three dilated 3x3), .img_pooling, .img_conv
    def __init__(self, cin, rates=(6, 12, 18)):
        super().__init__()
        self.features = nn.ModuleList([_cbr(cin, 256)] + [_cbr(cin, 256, 3, r) for r in rates])
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = _cbr(cin, 256)

    def forward(self, x):
        pooled = F.interpolate(self.img_conv(self.img_pooling(x)), x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([pooled] + [f(x) for f in self.features], 1)  # image pooling first


class ReleasedDeepV3Plus(nn.Module):
    """The released DeepV3Plus, variant D16 (output stride 16), wt_layer 0 0 1 1 1 0 0 (IN at the
    stem and at the end of layer1/layer2), eval forward only."""

    def __init__(self, trunk=resnet50, num_classes=19):
        super().__init__()
        r = trunk()
        self.layer0 = nn.Sequential(r.conv1, nn.InstanceNorm2d(64), nn.ReLU(inplace=True), r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        for n, m in self.layer4.named_modules():  # D16: conv2 of every layer4 block, downsample stride 1
            if "conv2" in n:
                m.dilation, m.padding, m.stride = (2, 2), (2, 2), (1, 1)
            elif "downsample.0" in n:
                m.stride = (1, 1)
        c1, c3, c4 = self.layer1[-1].conv1.in_channels, self.layer3[-1].conv1.in_channels, self.layer4[-1].conv1.in_channels
        self.in1, self.in2 = nn.InstanceNorm2d(c1), nn.InstanceNorm2d(self.layer2[-1].conv1.in_channels)
        self.aspp = _ASPP(c4)
        self.bot_fine = _cbr(c1, 48)
        self.bot_aspp = _cbr(1280, 256)
        self.final1 = nn.Sequential(*_cbr(304, 256, 3), *_cbr(256, 256, 3))
        self.final2 = nn.Sequential(nn.Conv2d(256, num_classes, 1, bias=True))
        self.dsn = nn.Sequential(nn.Conv2d(c3, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
                                 nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1))
        self.ProjectionHead_cls_0 = _Head(c4)
        self.ProjectionHead_cls_1 = _Head(304)
        self.ProjectionHead_cls_2 = _Head(256)

    @staticmethod
    def _stage(layer, x, norm=None):
        for i, blk in enumerate(layer):
            res = x if blk.downsample is None else blk.downsample(x)
            y = F.relu(blk.bn1(blk.conv1(x)))
            if hasattr(blk, "conv3"):
                y = blk.bn3(blk.conv3(F.relu(blk.bn2(blk.conv2(y)))))
            else:
                y = blk.bn2(blk.conv2(y))
            y = y + res
            if norm is not None and i == len(layer) - 1:
                y = norm(y)  # the released IN sits after the residual add of the stage's last block
            x = F.relu(y)
        return x

    def forward(self, x):
        size = x.shape[-2:]
        x = self.layer0(x)
        low = self._stage(self.layer1, x, self.in1)
        x = self._stage(self.layer4, self._stage(self.layer3, self._stage(self.layer2, low, self.in2)))
        up = F.interpolate(self.bot_aspp(self.aspp(x)), low.shape[-2:], mode="bilinear", align_corners=True)
        dec2 = self.final2(self.final1(torch.cat([self.bot_fine(low), up], 1)))
        return F.interpolate(dec2, size, mode="bilinear", align_corners=True)


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BN statistic random (so a wrong mapping cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))
    return net


def _released_file(path: Path, net: nn.Module, prefix: str = "module.") -> Path:
    """The released trainer's checkpoint format: DDP-prefixed state dict + optimizer + metadata."""
    torch.save({"state_dict": {prefix + k: v for k, v in net.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 3}, "epoch": 3, "mean_iu": np.float64(0.4123),
                "command": "train.py --arch network.deepv3.DeepR50V3PlusD"}, path)
    return path


def _r50_config(tmp_path: Path) -> Path:
    cfg = load_config(REPO / "configs" / "blindnet_r50_gta5.yaml", [f"run.output_dir={tmp_path}/run"])
    save_config(cfg, tmp_path / "r50.yaml")
    return tmp_path / "r50.yaml"


def test_key_map_matches_the_released_key_list_and_shapes():
    released = ReleasedDeepV3Plus().state_dict()
    ours = build_model("resnet50").state_dict()  # training network: aux head and projection heads
    assert len(ours) == len(released)
    mapped = {to_released(k): k for k in ours}
    assert set(mapped) == set(released)
    for r, o in mapped.items():
        assert released[r].shape == ours[o].shape, r
        assert from_released(r) == o
    # released names, spot-checked with their released shapes
    assert released["layer0.0.weight"].shape == ours["backbone.conv1.weight"].shape == (64, 3, 7, 7)
    assert released["bot_aspp.0.weight"].shape == (256, 1280, 1, 1)
    assert released["dsn.0.bias"].shape == ours["aux_head.body.0.bias"].shape == (512,)
    assert released["final1.3.weight"].shape == (256, 256, 3, 3) and "ProjectionHead_cls_1.proj.0.weight" in released
    assert to_released("backbone.body.stem.weight") is None  # timm backbones have no released counterpart
    with pytest.raises(InteropError, match="only torchvision ResNet"):
        released_state_dict({"backbone.body.stem.weight": torch.zeros(1)})


def test_imported_weights_give_the_released_networks_logits(tmp_path):
    torch.manual_seed(0)
    rel = _randomize(ReleasedDeepV3Plus(), seed=1).eval()
    src = _released_file(tmp_path / "best_cityscapes_epoch_3.pth", rel)
    report = import_checkpoint(src, _r50_config(tmp_path), tmp_path / "imported")
    assert report["loaded"] == len(rel.state_dict()) and not report["unknown_allowed"] and not report["missing_allowed"]
    assert report["released"]["epoch"] == 3 and report["released"]["mean_iu"] == pytest.approx(0.4123)
    assert report["released"]["other_keys"] == ["optimizer", "scheduler"]
    cfg = load_config(tmp_path / "imported" / "config.yaml")
    net = build_model(**{**model_kwargs(cfg), "pretrained": None})
    net.load_state_dict(ckpt.load_model_weights(tmp_path / "imported"))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        want = rel.double()(x)
        got = net.double().eval()(x)
    assert want.shape == got.shape == (2, 19, 64, 96) and float(want.std()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the same network with torchvision's block-0 rule (layer4.0 at dilation 1) computes other logits
    net.backbone.layer4[0].conv2.dilation, net.backbone.layer4[0].conv2.padding = (1, 1), (1, 1)
    with torch.no_grad():
        assert float((net(x) - want).abs().max()) > 1e-4 * float(want.abs().max())  # far above the 1e-10 match


def test_export_then_import_is_bitwise_and_keeps_the_logits(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(DEMO_CONFIG, [f"run.output_dir={run}"])
    save_config(cfg, run / "config.yaml")
    net = _randomize(build_model(**model_kwargs(cfg)), seed=3).eval()
    ck = ckpt.save_checkpoint(run, 5, model_state=net.state_dict(), state={})
    assert cli.main(["export-checkpoint", str(ck), "--out", str(tmp_path / "exp.pth")]) == 0
    raw = torch.load(tmp_path / "exp.pth", map_location="cpu", weights_only=True)
    assert {"state_dict", "epoch", "mean_iu", "command"} <= set(raw)  # what the released loader reads
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert "module.dsn.0.bias" in raw["state_dict"] and "module.layer0.0.weight" in raw["state_dict"]
    released, meta = load_released_file(tmp_path / "exp.pth")
    assert meta["epoch"] == 0
    assert cli.main(["import-checkpoint", str(tmp_path / "exp.pth"), "--config", str(run / "config.yaml"),
                     "--out", str(tmp_path / "back")]) == 0
    back = ckpt.load_model_weights(tmp_path / "back")
    own = net.state_dict()
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)
    twin = build_model(**model_kwargs(cfg))
    twin.load_state_dict(back)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), net(x))
    # an exported inference-only network (no heads) still maps; the released code keeps its own head init
    bare = {k: v for k, v in own.items() if not k.startswith(("aux_head.", "proj_heads."))}
    assert not any(k.startswith(("dsn.", "ProjectionHead")) for k in released_state_dict(bare, module_prefix=False))


def test_unknown_and_missing_keys_are_refused_unless_allowed(tmp_path, capsys):
    rel = ReleasedDeepV3Plus(trunk=resnet18)  # a resnet18 trunk: the demo config's backbone
    state = {k: v for k, v in rel.state_dict().items() if not k.startswith("dsn.")}
    state["criterion.weight"] = torch.ones(19)  # e.g. a class-weighted loss's buffer
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # an old-torch file
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 1, "mean_iu": 0.2},
               tmp_path / "r18.pth")
    args = ["import-checkpoint", str(tmp_path / "r18.pth"), "--config", str(DEMO_CONFIG), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "criterion.weight" in err and "dsn.0.weight" in err and "--allow-missing" in err, err
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert cli.main(args + ["--allow-missing", "criterion.*"]) == 2  # dsn still refused
    assert "dsn.4.bias" in capsys.readouterr().err
    assert cli.main(args + ["--allow-missing", "criterion.*", "dsn.*"]) == 0
    report = json.loads((tmp_path / "o" / "import.json").read_text())
    assert report["unknown_allowed"] == ["criterion.weight"]
    assert sorted(report["missing_allowed"]) == sorted(k for k in build_model("resnet18").state_dict()
                                                       if k.startswith("aux_head.") and "num_batches" not in k)
    assert report["counters_set_to_zero"] > 0
    w = ckpt.load_model_weights(tmp_path / "o")
    torch.testing.assert_close(w["backbone.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert cli.main(args + ["--allow-missing", "criterion.*", "dsn.*"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    # a wrong network for the file: shapes are always refused, whatever --allow-missing says
    with pytest.raises(InteropError, match="shape mismatch"):
        import_checkpoint(tmp_path / "r18.pth", DEMO_CONFIG, tmp_path / "o2", allow_missing=["*"],
                          overrides=["model.num_classes=7"])


def test_imported_checkpoint_evaluates_predicts_and_initializes_training(tmp_path):
    torch.manual_seed(0)
    net = _randomize(build_model("resnet18"), seed=5)
    torch.save({"state_dict": released_state_dict(net.state_dict()), "epoch": 2, "mean_iu": 0.3},
               tmp_path / "released.pth")
    assert cli.main(["import-checkpoint", str(tmp_path / "released.pth"), "--config", str(DEMO_CONFIG),
                     "--out", str(tmp_path / "imp")]) == 0
    shards = make_shards(tmp_path / "data", images=2)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "imp"), "--data", f"night={shards['night']}",
                     "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["checkpoint"] == str(tmp_path / "imp") and 0.0 <= result["targets"]["night"]["miou"] <= 1.0
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "imp"), "--images", str(images),
                     "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "masks" / "a.png").is_file()
    # model.init_from: the weights only
    fresh = build_model("resnet18")
    report = ckpt.load_init_weights(fresh, tmp_path / "imp")
    assert report["loaded"] == len(fresh.state_dict()) and not report["heads_kept_at_init"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_init_from_fits_heads_and_refuses_another_network(tmp_path):
    from blindseg_dist.config import ConfigError

    base = build_model("resnet18", aux=True, proj_heads=False)
    ckpt.save_checkpoint(tmp_path / "run", 1, model_state=base.state_dict(), state={})
    full = build_model("resnet18")
    heads_before = {k: v.clone() for k, v in full.state_dict().items() if k.startswith("proj_heads.")}
    report = ckpt.load_init_weights(full, tmp_path / "run" / "checkpoints" / "1")
    assert sorted(report["heads_kept_at_init"]) == sorted(heads_before)  # a baseline has no projection heads
    assert all(torch.equal(full.state_dict()[k], v) for k, v in heads_before.items())
    assert torch.equal(full.state_dict()["backbone.conv1.weight"], base.state_dict()["backbone.conv1.weight"])
    with pytest.raises(ConfigError, match="model.init_from.*does not fit"):
        ckpt.load_init_weights(build_model("resnet34"), tmp_path / "run" / "checkpoints" / "1")
    with pytest.raises(ConfigError, match="model.init_from.*no model weights"):
        ckpt.load_init_weights(full, tmp_path / "nothing")
    with pytest.raises(ConfigError, match="import-checkpoint"):
        ckpt.load_init_weights(full, tmp_path / "x.pth")


def test_train_starts_from_init_from_weights(tmp_path):
    """`blindseg train ... model.init_from=DIR`: step 0 holds the given weights (lr tiny, 1 step)."""
    from tests.engine._engine_runs import PY, TINY, env, run, tail, tiny_shards

    shards = tiny_shards(tmp_path / "d")
    init = _randomize(build_model("resnet18"), seed=9)
    ckpt.save_checkpoint(tmp_path / "src", 1, model_state=init.state_dict(), state={})
    out = tmp_path / "run"
    res = run([PY, "-m", "blindseg_dist", "train", "--config", str(DEMO_CONFIG), "--output-dir", str(out),
               "--max-steps", "1", f"data.train={shards}", *TINY, "optim.lr=1e-12", "optim.momentum=0",
               "optim.weight_decay=0", f"model.init_from={tmp_path / 'src' / 'checkpoints' / '1'}"], env())
    assert res.returncode == 0, tail(res)
    assert "model.init_from" in res.stderr
    w = ckpt.load_model_weights(out / "checkpoints" / "1")
    for k, v in init.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(w[k], v, rtol=0, atol=1e-6, msg=k)


def test_released_metadata_pickled_by_numpy_1_loads_without_unsafe_pickle(tmp_path):
    """The released environment (numpy 1.x) pickles mean_iu via numpy.core.multiarray.scalar; numpy 2
    writes numpy._core. Rewrite a file to the numpy-1 name and load it with weights_only."""
    import io
    import zipfile

    torch.save({"state_dict": {"module.final2.0.bias": torch.ones(19)}, "epoch": 4, "mean_iu": np.float64(0.45)},
               tmp_path / "new.pth")
    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "new.pth") as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    (tmp_path / "old.pth").write_bytes(buf.getvalue())
    state, meta = load_released_file(tmp_path / "old.pth")
    assert list(state) == ["final2.0.bias"] and meta["epoch"] == 4 and meta["mean_iu"] == pytest.approx(0.45)
    # anything that is not tensors / numbers is refused with a clear error, never executed
    torch.save({"state_dict": {"a": torch.ones(1)}, "args": Path("/x")}, tmp_path / "obj.pth")
    with pytest.raises(InteropError, match="weights_only"):
        load_released_file(tmp_path / "obj.pth")
