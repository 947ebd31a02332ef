"""Precision from one place (engine/accelerator.resolve_precision): run.mixed_precision when set wins
over the launcher's mixed_precision with a warning; null follows the launcher, else "no"."""
import logging

import pytest

from blindseg_dist.config import ConfigError, load_config
from blindseg_dist.engine.accelerator import resolve_precision
from tests.engine._eval_fixtures import DEMO_CONFIG


@pytest.mark.parametrize("mine, launcher, chosen, warns", [
    (None, None, "no", False), (None, "bf16", "bf16", False), ("no", None, "no", False),
    ("no", "bf16", "no", True), ("bf16", "no", "bf16", True), ("bf16", "bf16", "bf16", False)])
def test_config_wins_with_a_warning_null_follows_the_launcher(monkeypatch, caplog, mine, launcher, chosen, warns):
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = load_config(DEMO_CONFIG, [f"run.mixed_precision={'null' if mine is None else mine}"])
    assert cfg.run.mixed_precision == mine
    with caplog.at_level(logging.WARNING, logger="blindseg_dist"):
        assert resolve_precision(cfg) == chosen
    assert cfg.run.mixed_precision == chosen  # what DIR/config.yaml records
    warned = [r.getMessage() for r in caplog.records if "wins over the launcher" in r.getMessage()]
    assert bool(warned) == warns, warned
    if warns:
        assert f"run.mixed_precision={mine}" in warned[0] and f"mixed_precision={launcher}" in warned[0]


def test_a_bad_launcher_precision_is_a_config_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="fp8"):
        resolve_precision(load_config(DEMO_CONFIG))
