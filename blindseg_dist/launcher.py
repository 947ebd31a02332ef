"""Starting processes: one helper module for the library's tools, the tests and the benchmarks.

- :func:`free_port`: a free TCP port on this machine, for a rendezvous.
- :func:`blindseg_command` and :func:`launch_env`: the command line (and its environment) that runs
  ``blindseg ARGS`` in one process, or under ``accelerate launch`` on N CPU or GPU processes.
- :func:`run_gloo`: a Python function on N local processes joined in one gloo group (the CPU
  multi-process tests and benchmarks), each rank's return value collected, failures raised.
- :func:`main` (``python -m blindseg_dist.launcher ARGS``): ``accelerate launch ARGS`` whose exit
  code is the run's (docs/OPERATIONS.md, "Exit codes"): 0 after a signal when every rank wrote its
  checkpoint and exited 0, else the ranks' blindseg exit code (:func:`run_exit_code`).

The launcher trap this module exists for (docs/DISTRIBUTED.md, "Pitfalls"): on a machine without
GPUs, ``accelerate launch --cpu --num_processes N`` starts one process, and ``--multi_gpu`` without
CPU mode starts processes that never synchronize. What works is ``ACCELERATE_USE_CPU=1 accelerate
launch --multi_gpu --num_processes N``: :func:`launch_env` sets that variable in CPU mode.
"""
from __future__ import annotations

import os
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.multiprocessing as mp

from . import dist, runtime_env
from .errors import EXIT_PRIORITY


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def blindseg_command(args: Sequence[str], *, processes: int = 1, machines: int = 1, machine_rank: int = 0,
                     main_ip: str = "127.0.0.1", port: int | None = None, config_file: str | Path | None = None,
                     mixed_precision: str = "no", python: str = sys.executable,
                     launcher: str = "accelerate") -> list[str]:
    """The command line of ``blindseg ARGS`` (as ``python -m blindseg_dist ARGS``).

    One process on one machine without ``config_file``: the plain command. Otherwise under
    ``accelerate launch`` with a rendezvous on ``port`` (default: a free one): with
    ``config_file`` (an accelerate YAML, e.g. launch/accelerate/deepspeed_zero2.yaml, which sets
    the processes, engine and precision), or ``--multi_gpu --num_processes PROCESSES`` (in total,
    over all ``machines``) ``--num_machines MACHINES`` and, for several machines, this one's
    ``--machine_rank`` and the main machine's address. Run it with :func:`launch_env`.
    ``launcher``: "accelerate" (``accelerate launch``) or "blindseg" (:func:`main`, the same
    launch with the run's exit code).
    """
    if processes < 1 or machines < 1:
        raise ValueError(f"processes and machines must be >= 1, got {processes}, {machines}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {sorted(LAUNCHERS)}, got {launcher!r}")
    module = ["-m", "blindseg_dist", *args]
    if processes == 1 and machines == 1 and config_file is None:
        return [python, *module]
    cmd = [python, "-m", LAUNCHERS[launcher], "--main_process_port", str(port or free_port())]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    else:
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", str(machines),
                "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
        if machines > 1:
            cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_ip]
    return cmd + module


LAUNCHERS = {"accelerate": "accelerate.commands.launch", "blindseg": "blindseg_dist.launcher"}


def launch_env(*, cpu: bool | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a :func:`blindseg_command`: ``base`` (default: this process's environment)
    with OMP_NUM_THREADS=1 and :data:`runtime_env.DEFAULTS` unless ``base`` sets them, and in CPU mode ``ACCELERATE_USE_CPU=1``.
    ``cpu``: None = CPU mode when this machine has no GPU; False for a DeepSpeed launch on the
    CPU (the trainer then leaves Accelerate's CPU mode itself and names gloo)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    runtime_env.apply_defaults(env)  # huge pages for large CPU buffers (blindseg_dist/runtime_env.py)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def _gloo_entry(fn: Callable, rank: int, world: int, port: int, out, args: tuple, collective_timeout_s: float) -> None:
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        with dist.gloo_group(rank, world, collective_timeout_s):
            if (dist.rank(), dist.world_size()) != (rank, world):
                raise RuntimeError(f"rank {rank} of {world} sees itself as rank {dist.rank()} of {dist.world_size()}")
            out.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # report, never hang the parent
        out.put((rank, "error", traceback.format_exc()))


def run_gloo(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 150.0,
             collective_timeout_s: float = 60.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; their return values in rank order.

    Each process: 1 torch thread, a gloo group on 127.0.0.1 and a free port, whose collectives
    fail after ``collective_timeout_s`` (a rank that skips a collective errors instead of hanging).
    ``fn`` and ``args`` must be picklable (a module-level function); return plain data (numbers,
    lists, numpy arrays): tensors would share memory with the exiting worker. Raises RuntimeError
    with the failing ranks' tracebacks, or TimeoutError after ``timeout`` seconds; the processes
    left are killed in every case. The processes may start their own (DataLoader workers).
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_entry, args=(fn, r, world, port, out, args, collective_timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"gloo workers did not finish within {timeout:.0f} s "
                                   f"(got ranks {sorted(results)}): a hang?")
            try:
                rank, status, payload = out.get(timeout=min(remaining, 5.0))
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and out.empty():
                    raise RuntimeError(f"a gloo worker died: exit codes {[p.exitcode for p in procs]}") from None
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise RuntimeError("gloo worker failed:\n" + "\n".join(errors))
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


# ---- `python -m blindseg_dist.launcher`: accelerate launch with the run's exit code -----------------


def run_exit_code(codes: Sequence[int]) -> int:
    """The exit code of a run from its ranks' exit codes: 0 when all are 0; else the most telling
    blindseg code present, in the order 2 (config), 3 (non-finite losses), 1 (an error, printed by
    the rank that had it), 4 (a collective failed: a rank died or hung); else 128 + the signal of a
    rank killed by one (e.g. 137 for SIGKILL), else the largest code."""
    bad = [int(c) for c in codes if int(c) != 0]
    if not bad:
        return 0
    for code in EXIT_PRIORITY:
        if code in bad:
            return code
    killed = [128 - c for c in bad if c < 0]
    return max(killed) if killed else max(bad)


class _SignalForwarder:
    """The launcher's SIGTERM/SIGINT: the first is passed to the rank processes (its children),
    which checkpoint at their next step and exit 0, so that the launch succeeds; a second one
    falls back to torch elastic's shutdown (the signal again, SIGKILL after 30 s). Copies of the
    first that arrive within ``DUPLICATE_S`` seconds (a signal sent to the process group and also
    forwarded by a parent, e.g. srun or the SLURM script) count as the first."""

    DUPLICATE_S = 3.0

    def __init__(self) -> None:
        self.received: list[int] = []
        self.first_at: float | None = None

    def install(self) -> "_SignalForwarder":
        # torch elastic would turn these into an exception (launcher exit 1) even when every rank
        # checkpointed and exited 0: it keeps SIGHUP/SIGQUIT, we take SIGTERM/SIGINT
        # (torchrun's --signals-to-handle, read from PET_SIGNALS_TO_HANDLE by the parser accelerate uses)
        os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at < self.DUPLICATE_S:
            return  # the same stop request, delivered twice (also while this handler runs)
        self.first_at = self.first_at or now
        self.received.append(signum)
        import psutil

        name = signal.Signals(signum).name
        if len(self.received) > 1:
            from torch.distributed.elastic.multiprocessing.api import SignalException

            print(f"[launch] second {name}: stopping the ranks now", file=sys.stderr, flush=True)
            raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
        ranks = psutil.Process().children()
        for child in ranks:
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        print(f"[launch] {name}: passed to {len(ranks)} rank process(es); they checkpoint at their next "
              f"step and exit 0 (a second {name} stops them at once)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m blindseg_dist.launcher ARGS``: ``accelerate launch ARGS``, exit code = the run's.

    0 when every rank exited 0 (finished, or stopped by SIGTERM/SIGINT with a checkpoint: the
    signal, to this process, to the ranks or to the whole group, is passed on to the ranks and the
    launch ends normally); otherwise :func:`run_exit_code` of the ranks' codes; 128 + signal
    when a second signal forced the ranks down."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    import psutil  # noqa: F401  (imported before any signal: the handler must not wait for it)

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    forwarder = _SignalForwarder().install()
    try:
        launch_command(args)
    except SignalException as e:
        print(f"[launch] stopped by a second signal ({e}); the ranks were stopped at once, the last "
              "checkpoint may be older", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {int(r): int(f.exitcode) for r, f in e.failures.items()}
        code = run_exit_code(list(codes.values()))
        print(f"{e}\n[launch] rank exit codes {codes}: exit code {code} (see the first failing rank's "
              "message above)", file=sys.stderr, flush=True)
        return code
    except subprocess.CalledProcessError as e:  # one process (accelerate's simple launcher)
        code = run_exit_code([e.returncode])
        print(f"[launch] the process exited with {e.returncode}: exit code {code}", file=sys.stderr, flush=True)
        return code
    if forwarder.received:
        print("[launch] every rank stopped after a signal with a checkpoint: exit code 0", file=sys.stderr,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
