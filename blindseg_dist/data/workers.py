"""Signals and lifetime of the DataLoader's helper processes (docs/OPERATIONS.md, "Signals and preemption").

The training process owns SIGINT/SIGTERM: Ctrl-C and a scheduler's SIGTERM reach the whole
process group, and a DataLoader worker that died of them would end the run without a checkpoint
("DataLoader worker exited unexpectedly"). So:

- :func:`worker_init` (the loader's ``worker_init_fn``) makes a worker ignore SIGINT/SIGTERM and
  end itself as soon as the training process that owns it is gone, however it ended (kill -9
  included). A worker's parent is the forkserver, not the training process, so torch's own
  parent watchdog would never fire.
- :func:`guard_forkserver` (run in the forkserver, through its preload module
  ``blindseg_dist.data._forkserver``) makes the forkserver ignore SIGINT/SIGTERM (its children
  start that way) and die with its parent, the training process (``PR_SET_PDEATHSIG``).
- :func:`track` registers a loader iterator whose workers are shut down at interpreter exit
  (:func:`shutdown_workers`): multiprocessing's exit handler ends daemonic children with SIGTERM,
  which the workers ignore, and would then wait for them forever.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import atexit
import threading
import time
import weakref
from typing import Any

_PR_SET_PDEATHSIG = 1


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM are the training process's: ignore them here."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel for signal ``sig`` when the parent ends (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_when_gone(pid: int, *, poll_s: float = 0.5) -> threading.Thread:
    """A daemon thread that ends this process (``os._exit(0)``) as soon as process ``pid`` ends.

    Waits on a pidfd (Linux 5.3+: immediate); elsewhere polls every ``poll_s`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        os._exit(0)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
            os._exit(0)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # pid reused by another user's process: ours is gone
                os._exit(0)
            time.sleep(poll_s)

    t = threading.Thread(target=watch, name=f"blindseg-owner-{pid}", daemon=True)
    t.start()
    return t


def worker_init(owner_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of the training loader (bound to the training process's pid with
    functools.partial): runs after torch installed its worker signal handlers, so it overrides
    torch's SIGTERM handler."""
    ignore_stop_signals()
    exit_when_gone(owner_pid)


def guard_forkserver() -> None:
    """In the forkserver: ignore SIGINT/SIGTERM (inherited by every worker it forks, so a worker
    ignores them from its first instruction) and die with the training process."""
    ignore_stop_signals()
    die_with_parent()


_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
_REGISTERED = False


def track(iterator: Any) -> None:
    """Shut down the workers of this DataLoader iterator at interpreter exit (if still alive)."""
    global _REGISTERED
    _LIVE.add(iterator)
    if not _REGISTERED:  # registered after multiprocessing's exit handler, so it runs before it
        atexit.register(shutdown_workers)
        _REGISTERED = True


def shutdown_workers(iterator: Any = None) -> None:
    """End the workers of ``iterator`` (default: of every tracked iterator): the DataLoader's own
    shutdown (a sentinel each worker obeys at once), then SIGKILL for any worker still alive."""
    for it in ([iterator] if iterator is not None else list(_LIVE)):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is None:
            continue
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        for w in getattr(it, "_workers", []):
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        _LIVE.discard(it)
