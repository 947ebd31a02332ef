from pathlib import Path

import pytest
import yaml

from blindseg_dist.config import Config, ConfigError, load_config, model_kwargs, save_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_reference_recipe():
    cfg = load_config()
    assert (cfg.loss.aux, cfg.loss.cml, cfg.loss.ccl, cfg.loss.cwcl, cfg.loss.sdcl) == (0.4, 0.2, 0.2, 0.3, 0.3)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.poly_power) == (0.01, 0.9, 5e-4, 0.9)
    assert cfg.optim.max_steps == 40000 and cfg.run.seed == 304 and cfg.data.crop_size == 768
    assert cfg.loss.cwcl_negatives == "reference" and cfg.loss.covariance_scope == "image"


@pytest.mark.parametrize("name", ["demo.yaml", "blindnet_r50_gta5.yaml", "baseline_r50_gta5.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)


def test_baseline_has_no_training_only_heads_but_same_network():
    base = model_kwargs(load_config(REPO / "configs" / "baseline_r50_gta5.yaml"))
    full = model_kwargs(load_config(REPO / "configs" / "blindnet_r50_gta5.yaml"))
    assert base["proj_heads"] is False and full["proj_heads"] is True
    assert base["in_losses"] is False and full["in_losses"] is True  # CML/CCL read the IN outputs (ViT pyramid)
    training_only = ("proj_heads", "in_losses")
    assert ({k: v for k, v in base.items() if k not in training_only}
            == {k: v for k, v in full.items() if k not in training_only})


def test_overrides_are_typed():
    cfg = load_config(overrides=["optim.lr=0.02", "loss.cml=0", "data.scale_range=[0.75, 1.25]",
                                 "eval.targets={a: /x}", "model.pretrained=null", "loss.two_view=true"])
    assert cfg.optim.lr == 0.02 and cfg.loss.cml == 0.0 and cfg.data.scale_range == [0.75, 1.25]
    assert cfg.eval.targets == {"a": "/x"} and cfg.model.pretrained is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["optim.lrr", "allowed keys", "lr"]),
        ("loss.ce_scope=foo", ["loss.ce_scope", "foo", "reference", "exact"]),
        ("optim.max_steps=abc", ["optim.max_steps", "abc", "int"]),
        ("optim.max_steps=0", ["optim.max_steps", "> 0"]),
        ("loss.cwcl_global_keys=0", ["loss.cwcl_global_keys", "> 0"]),
        ("loss.cwcl_global_keys=1.5", ["loss.cwcl_global_keys", "1.5", "int"]),
        ("data.class_uniform=2", ["data.class_uniform", "[0, 1]"]),
        ("loss.two_view=false", ["loss.two_view", "cml"]),
        ("run.mixed_precision=fp8", ["run.mixed_precision", "bf16"]),
        ("nosection.x=1", ["nosection", "allowed keys"]),
        ("optim", ["section.key=value"]),
    ],
)
def test_bad_keys_and_values_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    for w in words:
        assert w in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["optim.lr=0.03", "eval.targets={city: /data/c}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.03


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_allowed_values_come_from_the_modules_that_implement_them():
    from blindseg_dist.config import CHOICES
    from blindseg_dist.data.stream import ON_CORRUPT
    from blindseg_dist.losses import contrastive, covariance, segmentation

    assert CHOICES["loss.ce_scope"] is segmentation.SCOPES
    assert CHOICES["loss.covariance_scope"] is covariance.SCOPES
    assert CHOICES["loss.contrastive_scope"] is contrastive.SCOPES
    assert CHOICES["loss.cwcl_negatives"] is contrastive.NEGATIVES
    assert CHOICES["data.on_corrupt"] is ON_CORRUPT
    for key, allowed in CHOICES.items():  # every allowed value loads, a foreign one is refused naming the key
        section, name = key.split(".")
        for value in allowed:
            assert getattr(getattr(load_config(overrides=[f"{key}={value}"]), section), name) == value
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_config(overrides=[f"{key}=nope"])


def test_loss_errors_name_the_real_config_keys():
    import torch

    from blindseg_dist import losses

    feats = [torch.zeros(1, 2, 4, 4)]
    with pytest.raises(ValueError, match="loss.covariance_scope"):
        losses.covariance_matching_loss(feats, feats, scope="pixel")
    with pytest.raises(ValueError, match="loss.ce_scope"):
        losses.segmentation_loss(torch.zeros(1, 19, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), scope="pixel")
    emb, lab = torch.zeros(1, 8, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="loss.contrastive_scope"):
        losses.class_wise_contrastive_loss(emb, emb, lab, lab, scope="pixel")
    with pytest.raises(ValueError, match="loss.cwcl_negatives"):
        losses.class_wise_contrastive_loss(emb, emb, lab, lab, negatives="some")
    with pytest.raises(ValueError, match="loss.contrastive_scope"):
        losses.semantic_disentanglement_loss(emb, emb, lab, lab, lab, scope="pixel")


def test_yaml_no_is_a_string_for_string_keys_and_false_for_boolean_keys(tmp_path):
    # YAML 1.1 would read `no` as False, and run.mixed_precision would become 'False'
    cfg = load_config(overrides=["run.mixed_precision=no", "loss.two_view=no", "loss.cml=0", "loss.ccl=0",
                                 "loss.cwcl=0", "loss.sdcl=0", "model.channels_last=on"])
    assert cfg.run.mixed_precision == "no" and cfg.loss.two_view is False and cfg.model.channels_last is True
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  mixed_precision: no\nmodel:\n  grad_checkpointing: yes\n")
    cfg = load_config(f)
    assert cfg.run.mixed_precision == "no" and cfg.model.grad_checkpointing is True


def test_configs_resolve_by_path_or_shipped_name(tmp_path, monkeypatch):
    from blindseg_dist.config import find_config, shipped_config_names

    monkeypatch.chdir(tmp_path)  # outside the repository: configs/... is not a file here
    assert find_config("configs/demo.yaml") == find_config("demo") == find_config("demo.yaml")
    assert find_config("demo").read_text() == (REPO / "configs" / "demo.yaml").read_text()
    assert load_config("scaling/resnet101").model.backbone == "resnet101"
    (tmp_path / "demo.yaml").write_text("optim:\n  max_steps: 7\n")
    assert load_config("demo.yaml").optim.max_steps == 7  # an existing file wins over a shipped name
    with pytest.raises(ConfigError, match="shipped config name: .*blindnet_r50_gta5.*demo"):
        load_config("nope")
    names = shipped_config_names()
    assert "scaling/swin_tiny" in names and not any(n.startswith("ablation/") for n in names)
