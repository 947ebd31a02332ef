"""Run a function on W real gloo processes (CPU) and collect each rank's return value.

Used by test_dist_scopes.py. Every worker: 1 thread, MASTER_ADDR=127.0.0.1 on a free port,
a process group with a 60 s timeout (a rank that skips a collective fails instead of hanging
forever), and the parent gives up after `timeout` seconds and kills what is left.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out, args) -> None:
    try:
        import torch
        import torch.distributed as tdist

        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        tdist.init_process_group("gloo", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=60))
        try:
            from blindseg_dist import dist

            assert dist.world_size() == world and dist.rank() == rank and dist.is_distributed()
            out.put((rank, "ok", fn(rank, world, *args)))
        finally:
            tdist.destroy_process_group()
    except BaseException:  # report, never hang the parent
        out.put((rank, "error", traceback.format_exc()))


def run_gloo(fn, world: int, *args, timeout: float = 150.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
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
                    raise RuntimeError(f"a gloo worker died: exit codes "
                                       f"{[p.exitcode for p in procs]}")
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
