"""ImageNet weights: the guard of the reference recipes, the explicit "none",
recognition of torchvision's V1 / V2 files by the sha256 of their bytes, and the load report."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from blindseg_dist import cli
from blindseg_dist.config import ConfigError, load_config, model_kwargs
from blindseg_dist.model import build_model
from blindseg_dist.model import pretrained as pt

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "configs" / "blindnet_r50_gta5.yaml"
URL = "https://download.pytorch.org/models/resnet50-19c8e357.pth"


@pytest.mark.parametrize("config", ["blindnet_r50_gta5.yaml", "baseline_r50_gta5.yaml"])
def test_reference_recipe_without_weights_exits_2_naming_the_file(config, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(REPO / "configs" / config), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in ("model.pretrained", "resnet50-19c8e357.pth", URL, "model.pretrained=pretrained/resnet50-19c8e357.pth",
                 "model.pretrained=none", "V2"):
        assert text in err, (text, err)
    assert not out.exists()  # stopped before writing anything


def test_explicit_none_trains_from_scratch_and_null_does_not():
    cfg = load_config(REFERENCE, ["model.pretrained=none"])
    assert cfg.model.pretrained == "none" and cfg.model.require_pretrained
    pt.check_pretrained(cfg.model)  # passes: random init chosen on purpose
    assert model_kwargs(cfg)["pretrained"] is None
    for spelling in ("None", "NONE"):
        assert load_config(REFERENCE, [f"model.pretrained={spelling}"]).model.pretrained == "none"
    for unset in ("null", "~"):
        cfg = load_config(REFERENCE, [f"model.pretrained={unset}"])
        assert cfg.model.pretrained is None
        with pytest.raises(ConfigError, match="model.pretrained"):
            pt.check_pretrained(cfg.model)
    pt.check_pretrained(load_config(REFERENCE, ["model.pretrained=/w/resnet50-19c8e357.pth"]).model)
    pt.check_pretrained(load_config(REFERENCE, ["model.init_from=/runs/x/checkpoints/9"]).model)  # every weight given
    pt.check_pretrained(load_config(REPO / "configs" / "demo.yaml").model)  # the demo needs no weights
    with pytest.raises(ConfigError, match="backbone 'timm:convnext_tiny'"):
        pt.check_pretrained(load_config(REFERENCE, ["model.backbone=timm:convnext_tiny"]).model)


def test_known_files_follow_torchvision_naming():
    files = {k.file: k for k in pt.KNOWN_WEIGHTS}
    assert files["resnet50-19c8e357.pth"].version == "V1" and files["resnet50-11ad3fa6.pth"].version == "V2"
    assert all(len(k.prefix) == 8 and int(k.prefix, 16) >= 0 and k.file.startswith(k.arch + "-") for k in pt.KNOWN_WEIGHTS)
    assert len({k.prefix for k in pt.KNOWN_WEIGHTS}) == len(pt.KNOWN_WEIGHTS)
    assert pt.RECOMMENDED["resnet50"] == "resnet50-19c8e357.pth" and pt.weights_url(pt.RECOMMENDED["resnet50"]) == URL
    assert all(files[f].version == "V1" for f in pt.RECOMMENDED.values())


def _fake_weights(path: Path) -> str:
    """A tiny 'ImageNet' file: a resnet18 state dict (torchvision names) with every tensor random."""
    state = resnet18().state_dict()
    g = torch.Generator().manual_seed(0)
    for v in state.values():
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g))
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("version, level", [("V1", "info"), ("V2", "warning")])
def test_a_known_file_is_recognised_by_content_whatever_its_name(tmp_path, monkeypatch, caplog, version, level):
    path = tmp_path / "my_backbone.pth"
    digest = _fake_weights(path)
    # the table entry a real torchvision file would have: <arch>-<first 8 hex of its sha256>.pth
    entry = pt.KnownWeights(f"resnet18-{digest[:8]}.pth", "resnet18", version, f"test {version} file")
    monkeypatch.setattr(pt, "KNOWN_WEIGHTS", (entry,))
    with caplog.at_level(logging.INFO, logger="blindseg_dist"):
        net = build_model("resnet18", pretrained=path)
    report = net.backbone.pretrained_report
    assert report["sha256"] == digest and report["known"] == entry.file and report["version"] == version
    assert report["level"] == level and f"ImageNet {version}" in report["message"]
    own = net.backbone.state_dict()
    assert report["loaded"] == len(own) and not report["missing"] and not report["unexpected"]
    assert report["skipped"] == sorted(k for k in resnet18().state_dict() if k.startswith(("bn1.", "fc.")))
    src = torch.load(path, weights_only=True)
    assert all(torch.equal(own[k], src[k]) for k in own)
    records = [r for r in caplog.records if entry.file in r.getMessage()]
    assert records and records[0].levelname == level.upper()
    # a file of another architecture than the run's backbone is a warning even when V1
    assert pt.identify_weights(path, "resnet50")["level"] == "warning"


def test_unknown_and_damaged_files_are_warned(tmp_path, caplog):
    unknown = tmp_path / "r18_imagenet.pth"
    digest = _fake_weights(unknown)
    with caplog.at_level(logging.INFO, logger="blindseg_dist"):
        net = build_model("resnet18", pretrained=unknown)
    report = net.backbone.pretrained_report
    assert report["known"] is None and report["level"] == "warning" and "unknown weights file" in report["message"]
    assert report["loaded"] == len(net.backbone.state_dict())
    assert any(r.levelname == "WARNING" and "unknown weights file" in r.getMessage() for r in caplog.records)
    # named like the V1 file, other bytes: a truncated or modified download
    fake_v1 = tmp_path / "resnet50-19c8e357.pth"
    fake_v1.write_bytes(unknown.read_bytes())
    ident = pt.identify_weights(fake_v1, "resnet50")
    assert ident["level"] == "warning" and "19c8e357" in ident["message"] and digest[:8] in ident["message"]
    assert "truncated or modified" in ident["message"]


def test_cli_shows_which_file_was_loaded(tmp_path, capsys, monkeypatch):
    """Through the CLI's logging: `blindseg flops` builds no weights, so use the loader the trainer uses."""
    path = tmp_path / "w.pth"
    digest = _fake_weights(path)
    monkeypatch.setattr(pt, "KNOWN_WEIGHTS", (pt.KnownWeights(f"resnet18-{digest[:8]}.pth", "resnet18", "V1", "t"),))
    cli._library_logging()
    build_model("resnet18", pretrained=path)
    err = capsys.readouterr().err
    assert f"resnet18-{digest[:8]}.pth" in err and "ImageNet V1" in err and "loaded" in err
