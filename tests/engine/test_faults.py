"""Faults: non-finite losses (skipped and counted; N in a row stop with a checkpoint), a rank that dies or
hangs (the others exit with a clear error within run.dist_timeout_s), and bad config keys at the CLI.

The faults are injected with the trainer's documented testing hooks (BLINDSEG_FAULT_* variables)."""
import subprocess
import time

import pytest
import torch

from blindseg_dist import cli
from blindseg_dist.engine import checkpoint as ckpt
from blindseg_dist.engine.trainer import EXIT_COLLECTIVE, EXIT_NONFINITE
from blindseg_dist.launcher import free_port
from tests.engine._engine_runs import ROOT, env, run, tail, train_cmd


def test_nonfinite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(train_shards, tmp_path):
    out = tmp_path / "run"
    # rank 0 only: the skip decision must still be taken by both ranks (else the run hangs)
    e = env(BLINDSEG_FAULT_NAN="1,3,4", BLINDSEG_FAULT_RANK="0")
    res = run(train_cmd(out, train_shards, 6, "run.max_nonfinite=2", "run.dist_timeout_s=60"), e)
    assert res.returncode != 0 and f"exitcode  : {EXIT_NONFINITE}" in res.stderr + res.stdout, tail(res)
    text = res.stdout + res.stderr
    assert "step 1: non-finite loss, step skipped (1 in a row)" in text
    assert "2 non-finite losses in a row (run.max_nonfinite)" in text
    # attempts: 0 ok (step 1), 1 NaN, 2 ok (step 2), 3 NaN, 4 NaN -> stop at step 2 with a checkpoint
    last = ckpt.latest_checkpoint(out)
    assert last is not None and last.name == "2"
    state, _ = ckpt.load_state(last)
    assert state["counters"]["nonfinite_skipped"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt.load_model_weights(last).values())


def test_a_rank_that_dies_makes_the_other_node_exit_with_a_clear_error(train_shards, tmp_path):
    # two launches ("nodes") so that no launcher kills the survivor for us: it must notice by itself
    out, port = tmp_path / "run", free_port()
    e = env(BLINDSEG_FAULT_EXIT="1", BLINDSEG_FAULT_RANK="1")
    t = time.perf_counter()
    nodes = [subprocess.Popen(train_cmd(out, train_shards, 6, "run.dist_timeout_s=30", processes=2, machines=2,
                                        machine_rank=r, port=port),
                              env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    survivor = nodes[0].communicate(timeout=120)[0]
    elapsed = time.perf_counter() - t
    nodes[1].communicate(timeout=60)
    assert nodes[1].returncode != 0
    assert nodes[0].returncode != 0 and elapsed < 90, (elapsed, survivor[-3000:])
    assert "rank 0: a collective failed" in survivor and "Another rank died or hung" in survivor, survivor[-3000:]
    assert f"exitcode  : {EXIT_COLLECTIVE}" in survivor


def test_a_rank_that_hangs_makes_the_others_exit_within_the_timeout(train_shards, tmp_path):
    e = env(BLINDSEG_FAULT_HANG="1", BLINDSEG_FAULT_RANK="1")
    proc = subprocess.Popen(train_cmd(tmp_path / "run", train_shards, 6, "run.dist_timeout_s=10"), env=e, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    lines = []
    for line in proc.stdout:  # timestamps as the lines arrive
        lines.append(line)
        if "rank 1: hanging" in line:
            seen["hang"] = time.perf_counter()
        if "rank 0: a collective failed" in line:
            seen["error"] = time.perf_counter()
    proc.wait(timeout=120)
    text = "".join(lines)[-4000:]
    assert proc.returncode != 0 and seen.keys() == {"hang", "error"}, text
    # the survivor gives up after run.dist_timeout_s (+ slack for a loaded machine), not never;
    # the launcher then stops the hung rank (SIGTERM, SIGKILL after its grace period)
    assert seen["error"] - seen["hang"] < 10 + 25, seen["error"] - seen["hang"]
    assert "run.dist_timeout_s=10" in text and f"exitcode  : {EXIT_COLLECTIVE}" in text


@pytest.mark.parametrize("override, expected", [
    ("bad.key=1", ["unknown config key 'bad'", "allowed keys here:", "optim"]),
    ("run.mixed_precision=fp8", ["run.mixed_precision", "'fp8'", "['no', 'bf16', 'fp16']"]),
    ("optim.lr=fast", ["optim.lr", "'fast'", "float"]),
])
def test_cli_reports_bad_config_key_and_value(override, expected, capsys, tmp_path):
    rc = cli.main(["train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(tmp_path), override])
    err = capsys.readouterr().err
    assert rc == 2
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "config.yaml").exists()  # nothing started
