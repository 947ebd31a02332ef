"""Starting processes: one helper module for the library's tools, the tests and the benchmarks.

- :func:`free_port`: a free TCP port on this machine, for a rendezvous.
- :func:`blindseg_command` and :func:`launch_env`: the command line (and its environment) that runs
  ``blindseg ARGS`` in one process, or under ``accelerate launch`` on N CPU or GPU processes.
- :func:`run_gloo`: a Python function on N local processes joined in one gloo group (the CPU
  multi-process tests and benchmarks), each rank's return value collected, failures raised.

The launcher trap this module exists for (docs/DISTRIBUTED.md, "Pitfalls"): on a machine without
GPUs, ``accelerate launch --cpu --num_processes N`` starts one process, and ``--multi_gpu`` without
CPU mode starts processes that never synchronize. What works is ``ACCELERATE_USE_CPU=1 accelerate
launch --multi_gpu --num_processes N``: :func:`launch_env` sets that variable in CPU mode.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from . import dist


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def blindseg_command(args: Sequence[str], *, processes: int = 1, machines: int = 1, machine_rank: int = 0,
                     main_ip: str = "127.0.0.1", port: int | None = None, config_file: str | Path | None = None,
                     mixed_precision: str = "no", python: str = sys.executable) -> list[str]:
    """The command line of ``blindseg ARGS`` (as ``python -m blindseg_dist ARGS``).

    One process on one machine without ``config_file``: the plain command. Otherwise under
    ``accelerate launch`` with a rendezvous on ``port`` (default: a free one): with
    ``config_file`` (an accelerate YAML, e.g. launch/accelerate/deepspeed_zero2.yaml, which sets
    the processes, engine and precision), or ``--multi_gpu --num_processes PROCESSES`` (in total,
    over all ``machines``) ``--num_machines MACHINES`` and, for several machines, this one's
    ``--machine_rank`` and the main machine's address. Run it with :func:`launch_env`.
    """
    if processes < 1 or machines < 1:
        raise ValueError(f"processes and machines must be >= 1, got {processes}, {machines}")
    module = ["-m", "blindseg_dist", *args]
    if processes == 1 and machines == 1 and config_file is None:
        return [python, *module]
    cmd = [python, "-m", "accelerate.commands.launch", "--main_process_port", str(port or free_port())]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    else:
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", str(machines),
                "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
        if machines > 1:
            cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_ip]
    return cmd + module


def launch_env(*, cpu: bool | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a :func:`blindseg_command`: ``base`` (default: this process's environment)
    with OMP_NUM_THREADS=1 unless ``base`` sets it, and in CPU mode ``ACCELERATE_USE_CPU=1``.
    ``cpu``: None = CPU mode when this machine has no GPU; False for a DeepSpeed launch on the
    CPU (the trainer then leaves Accelerate's CPU mode itself and names gloo)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
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
        tdist.init_process_group("gloo", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=collective_timeout_s))
        try:
            if (dist.rank(), dist.world_size()) != (rank, world):
                raise RuntimeError(f"rank {rank} of {world} sees itself as rank {dist.rank()} of {dist.world_size()}")
            out.put((rank, "ok", fn(rank, world, *args)))
        finally:
            tdist.destroy_process_group()
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
