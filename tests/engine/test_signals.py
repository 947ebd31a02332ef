"""Signals and process lifetime, in real launches (docs/OPERATIONS.md, "Signals and preemption").

SIGINT/SIGTERM to the whole process group (a terminal's Ctrl-C, SLURM), to the launcher only or
to the rank processes only: training checkpoints and exits 0, DataLoader workers survive the
signal, and the launcher (blindseg_dist.launcher, the SLURM script) exits 0 as well; plain
`accelerate launch` exits 1 (torch elastic's SignalException) although the ranks checkpointed.
kill -9 of a rank leaves no process of its tree behind (forkserver, workers, resource tracker)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from blindseg_dist.engine import checkpoint as ckpt
from blindseg_dist.launcher import free_port
from tests.engine._engine_runs import ROOT, env, summary, train_cmd

WORKERS = ["data.num_workers=1", "run.checkpoint_every=1000"]  # one DataLoader worker: the process that died


class Run:
    """A process started in its own session (its pid is the process group id), output collected."""

    def __init__(self, cmd: list[str], e: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # tqdm's \r counts as a line end
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.kill()
                raise AssertionError(f"{needle!r} never appeared (rc={self.proc.poll()}):\n{self.text[-4000:]}")
            time.sleep(0.2)

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def finish(self, timeout: float = 180) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not exit within {timeout} s:\n{self.text[-4000:]}") from None
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _in_the_loop(run: Run) -> None:
    run.wait_for("loss=")  # the progress bar shows a loss: at least one step done, the worker is up


def _assert_stopped_with_checkpoint(out: Path, text: str, *, launcher_traceback: bool = False) -> None:
    assert "exited unexpectedly" not in text, text[-4000:]
    assert launcher_traceback or "Traceback" not in text, text[-4000:]
    last = ckpt.latest_checkpoint(out)
    assert last is not None and int(last.name) >= 1, text[-4000:]
    s = summary(out)
    assert s["stop_reason"] == "stopped by signal" and s["checkpoint"] == str(last)


def test_ctrl_c_to_the_group_of_one_process_with_a_worker(train_shards, tmp_path):
    out = tmp_path / "run"
    run = Run(train_cmd(out, train_shards, 500, *WORKERS, processes=1), env())
    _in_the_loop(run)
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the worker gets it too
    rc = run.finish()
    assert rc == 0, run.text[-4000:]
    _assert_stopped_with_checkpoint(out, run.text)


@pytest.mark.parametrize("launcher, target, sig, expected", [
    ("blindseg", "group", signal.SIGINT, 0),
    ("blindseg", "launcher", signal.SIGTERM, 0),
    ("blindseg", "ranks", signal.SIGTERM, 0),
    ("accelerate", "group", signal.SIGTERM, 1),  # plain accelerate launch: torch elastic's SignalException
])
def test_a_signal_stops_two_processes_with_a_checkpoint(launcher, target, sig, expected, train_shards, tmp_path):
    out = tmp_path / "run"
    run = Run(train_cmd(out, train_shards, 500, *WORKERS, launcher=launcher), env())
    _in_the_loop(run)
    if target == "group":
        os.killpg(run.proc.pid, sig)
    elif target == "launcher":
        run.proc.send_signal(sig)
    else:
        ranks = psutil.Process(run.proc.pid).children()
        assert len(ranks) == 2
        for r in ranks:
            r.send_signal(sig)
    rc = run.finish()
    assert rc == expected, run.text[-4000:]
    _assert_stopped_with_checkpoint(out, run.text, launcher_traceback=launcher == "accelerate")
    if launcher == "blindseg":
        if target != "ranks":  # the launcher got the signal and passed it on
            assert "[launch] every rank stopped after a signal with a checkpoint: exit code 0" in run.text
    else:
        assert "SignalException" in run.text  # the launcher's exit code lies; use blindseg_dist.launcher


def _fake_slurm(bin_dir: Path) -> None:
    """srun (drops its options, runs the command as node 0) and scontrol (the node list) stand-ins."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'export SLURM_NODEID=0\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def test_the_slurm_script_exits_0_after_sigterm_with_a_checkpoint(train_shards, tmp_path):
    import sys

    out, bin_dir = tmp_path / "run", tmp_path / "bin"
    _fake_slurm(bin_dir)
    e = env()
    e.update(PATH=f"{bin_dir}:{e['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", GPUS_PER_NODE="2",
             ACCEL_CONFIG="launch/accelerate/cpu_2proc.yaml", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    args = train_cmd(out, train_shards, 500, *WORKERS, processes=1)[4:]  # after "python -m blindseg_dist train"
    config = args[args.index("--config") + 1]
    rest = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    run = Run(["bash", "launch/slurm/train.sbatch", config, *rest], e)
    _in_the_loop(run)
    os.killpg(run.proc.pid, signal.SIGTERM)  # preemption / scancel: every process of the job
    rc = run.finish()
    assert rc == 0, run.text[-4000:]
    _assert_stopped_with_checkpoint(out, run.text)
    assert "world size 2" in run.text


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_of_a_rank_leaves_no_process_behind(processes, train_shards, tmp_path):
    run = Run(train_cmd(tmp_path / "run", train_shards, 500, *WORKERS, "run.dist_timeout_s=20",
                        processes=processes, launcher="blindseg"), env())
    try:
        _in_the_loop(run)
        tree = run.tree()
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "multiprocessing.forkserver" in names  # the forkserver and its worker exist
        victim = tree[0] if processes == 1 else psutil.Process(run.proc.pid).children()[-1]
        victim.kill()
        deadline = time.monotonic() + (8 if processes == 1 else 30)
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(tree), (_alive(tree), run.text[-3000:])
    finally:
        run.kill()


def test_kill_9_of_the_launcher_stops_the_ranks_with_a_checkpoint(train_shards, tmp_path):
    # the ranks get SIGTERM from the kernel when their launcher dies (PR_SET_PDEATHSIG): they checkpoint and exit
    out = tmp_path / "run"
    run = Run(train_cmd(out, train_shards, 500, *WORKERS, launcher="blindseg"), env())
    try:
        _in_the_loop(run)
        tree = run.tree()
        run.proc.kill()
        deadline = time.monotonic() + 60
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(tree), (_alive(tree), run.text[-3000:])
        last = ckpt.latest_checkpoint(out)
        assert last is not None and summary(out)["stop_reason"] == "stopped by signal", run.text[-3000:]
    finally:
        run.kill()
