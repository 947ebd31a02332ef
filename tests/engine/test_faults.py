"""Faults: non-finite losses (skipped and counted; N in a row stop with a checkpoint), a rank that dies or
hangs (the others exit with a clear error within run.dist_timeout_s), and bad config keys at the CLI.

The faults are injected with the trainer's documented testing hooks (BLINDSEG_FAULT_* variables)."""
import ast
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


def test_an_error_on_one_rank_is_printed_there_and_named_by_the_others(train_shards, tmp_path):
    # a RuntimeError of rank 1's own work (not a failed collective): rank 1 prints its traceback, rank 0
    # names rank 1 and its error; exit 1 everywhere (4 is for a peer that died or hung without a word)
    out = tmp_path / "run"
    e = env(BLINDSEG_FAULT_RAISE="1", BLINDSEG_FAULT_RANK="1")
    res = run(train_cmd(out, train_shards, 6, "run.dist_timeout_s=60", launcher="blindseg"), e, timeout=400)
    text = res.stdout + res.stderr
    assert res.returncode == 1, tail(res)
    assert "RuntimeError: injected fault: rank 1 raises at step attempt 1" in text and "Traceback" in text, tail(res)
    assert "[train] rank 1: failed at step 1 (RuntimeError: injected fault" in text, tail(res)
    assert ("[train] rank 0: stopping at step 1: rank 1 failed at step 1 with RuntimeError: injected fault"
            in text), tail(res)
    assert "died or hung" not in text and "[launch] rank exit codes {" in text, tail(res)
    assert ckpt.list_checkpoints(out) == [] and not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("fault, error, code", [("1", "RuntimeError", 1), ("missing", "FileNotFoundError", 2)])
def test_a_set_up_error_on_one_rank_is_printed_there_and_named_by_the_others(fault, error, code, train_shards,
                                                                             tmp_path):
    # rank 1 fails before the loop (after the process group exists): same report as a loop error, not exit 4;
    # its code is the one `blindseg train` has for that error on one process (2: a missing file)
    out = tmp_path / "run"
    e = env(BLINDSEG_FAULT_SETUP=fault, BLINDSEG_FAULT_RANK="1")
    res = run(train_cmd(out, train_shards, 6, "run.dist_timeout_s=60", launcher="blindseg"), e, timeout=400)
    text = res.stdout + res.stderr
    assert res.returncode == code, tail(res)
    assert f"{error}: injected fault: rank 1 raises during set-up" in text and "Traceback" in text, tail(res)
    assert f"[train] rank 1: failed during set-up ({error}: injected fault" in text, tail(res)
    assert "[train] rank 0: stopping " in text and (f"rank 1 failed during set-up with {error}: injected fault"
                                                    in text), tail(res)
    assert "died or hung" not in text and "[launch] rank exit codes {" in text, tail(res)
    codes = ast.literal_eval("{" + text.split("[launch] rank exit codes {", 1)[1].split("}", 1)[0] + "}")
    assert codes == {0: code, 1: code}, codes  # both ranks, neither 4


def test_a_corrupt_shard_with_on_corrupt_fail_is_reported_as_such(train_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    for tar in shards.glob("*.tar"):  # every shard cut in the middle: both ranks fail on their first batch
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    res = run(train_cmd(tmp_path / "run", shards, 6, "data.on_corrupt=fail", "run.dist_timeout_s=60",
                        launcher="blindseg"), env(), timeout=400)
    text = res.stdout + res.stderr
    assert res.returncode == 1, tail(res)
    assert "CorruptShardError: corrupt shard" in text and "died or hung" not in text, tail(res)


def test_a_disk_too_full_for_the_next_checkpoint_stops_cleanly_and_keeps_the_previous(train_shards, tmp_path):
    # the free-space check sees 100 MB (BLINDSEG_FAULT_DISK_FREE): enough for the first checkpoint (the
    # weights alone, ~74 MB, as the estimate), not for the next (the last one takes ~150 MB with momentum)
    out = tmp_path / "run"
    e = env(BLINDSEG_FAULT_DISK_FREE=str(100 * 2**20))
    res = run(train_cmd(out, train_shards, 4, "run.checkpoint_every=2", "run.dist_timeout_s=60", launcher="blindseg"),
              e, timeout=400)
    text = res.stdout + res.stderr
    assert res.returncode == 1, tail(res)
    assert "checkpoint step 4 not written: OSError: [Errno 28] No space left for it in" in text, tail(res)
    assert "100.0 MB free, the last checkpoint takes" in text and "died or hung" not in text, tail(res)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["2"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    state, rng = ckpt.load_state(out / "checkpoints" / "2")
    assert state["step"] == 2 and rng is not None and ckpt.load_model_weights(out / "checkpoints" / "2")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 100 MB tmpfs (needs the right to mount: root in CI containers); unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); "
                    "the BLINDSEG_FAULT_DISK_FREE test covers the check")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_while_writing_a_checkpoint_removes_the_partial_folder(train_shards, small_tmpfs):
    # a real full disk: the weights (~74 MB) fit the 100 MB tmpfs, the optimizer state does not
    out = small_tmpfs / "run"
    res = run(train_cmd(out, train_shards, 2, "run.checkpoint_every=1", processes=1), env())
    text = res.stdout + res.stderr
    assert res.returncode == 1, tail(res)
    assert "blindseg train: checkpoint step 1 not written:" in text and "No space left on device" in text, tail(res)
    assert "Traceback" not in text, tail(res)
    assert ckpt.list_checkpoints(out) == [] and not list((out / "checkpoints").glob(".tmp-*"))
    import shutil

    assert shutil.disk_usage(small_tmpfs).used < 10 * 2**20  # the partial checkpoint's bytes are freed
