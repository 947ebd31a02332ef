import json
from pathlib import Path

from blindseg_dist.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_flops_command_writes_model_and_baseline(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert main(["flops", "--config", str(REPO / "configs" / "demo.yaml"), "--size", "64x128", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["size"] == [64, 128]
    inf, base = res["model"]["inference"], res["baseline"]["inference"]
    assert inf["params"] > 1e6 and inf["gflops"] > 0
    # BlindNet adds nothing at inference: identical network, identical FLOPs
    assert inf == base
    assert res["model"]["training_only"]["params"] > 0
    printed = capsys.readouterr().out
    assert "GFLOP" in printed or "gflops" in printed.lower()


def test_flops_bad_size_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["flops", "--config", str(REPO / "configs" / "demo.yaml"), "--size", "64by128"])
    assert "HxW" in capsys.readouterr().err
