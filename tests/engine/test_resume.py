"""Preemption and resume: SIGTERM writes a checkpoint and exits 0; `--resume` then reaches bitwise the
weights of an uninterrupted run (2 CPU processes, deterministic settings: 1 thread, 0 data workers)."""
import os
import signal
import subprocess
import time

import torch
from safetensors.torch import load_file

from blindseg_dist.engine import checkpoint as ckpt
from tests.engine._engine_runs import ROOT, env, run, summary, tail, train_cmd

STEPS = 6
ARGS = ("run.checkpoint_every=2", "run.keep_last=5")


def _workers(launcher_pid: int) -> list[int]:
    """The training processes: children of the `accelerate launch` process."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid:
                pids.append(int(d))
    return pids


def test_sigterm_checkpoints_and_resume_is_bitwise_identical(train_shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    res = run(train_cmd(a, train_shards, STEPS, *ARGS), env())
    assert res.returncode == 0, tail(res)

    # run B: SIGTERM to every training process (what a scheduler's preemption does) once step 2 is saved
    proc = subprocess.Popen(train_cmd(b, train_shards, STEPS, *ARGS), env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (b / "checkpoints" / "2").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]  # a clean, documented exit
    s = summary(b)
    assert s["stop_reason"] == "stopped by signal" and 2 <= s["steps"] < STEPS, s
    assert ckpt.latest_checkpoint(b).name == str(s["steps"])  # the signal wrote its own checkpoint

    res = run(train_cmd(b, train_shards, STEPS, *ARGS, resume=True), env())
    assert res.returncode == 0, tail(res)
    assert f"resumed from {b / 'checkpoints' / str(s['steps'])}" in res.stdout
    assert summary(b)["steps"] == STEPS and summary(b)["stop_reason"] == "finished"

    wa = load_file(str(a / "checkpoints" / str(STEPS) / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / str(STEPS) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # and training did move the weights (the comparison is not vacuous)
    w2 = load_file(str(b / "checkpoints" / "2" / "model.safetensors"))
    assert any(not torch.equal(w2[k], wa[k]) for k in wa)
