"""Every torch.distributed call of blindseg_dist lives here.

Each function has a single-process path that issues no collective (torch.distributed not
initialised, or a world of size 1), so the same loss code runs in a notebook.

Collectives with gradient use torch's functional collectives, whose autograd rules already
carry the cross-rank sum: all_reduce's backward is an all_reduce(sum) of the incoming
gradients, all_gather's backward is a reduce_scatter(sum). Do not replace them with
dist.all_reduce / dist.all_gather on tensors that need a gradient: those have no backward,
so the other ranks' share of the gradient is lost and, after DDP's averaging, the gradient
is 1/W too small (docs/DISTRIBUTED.md, "Gradient bookkeeping"). Proven by
tests/losses/test_dist_scopes.py (per-rank gradients == W x the 1-process gradient).

Rules for callers (a rank that skips a collective hangs the others):
- call every collective on every rank, in the same order, even with nothing to contribute
  (a count of 0, a tensor with 0 rows);
- branch around a collective only on values that are identical on every rank (reduced
  counts, gathered sizes);
- a tensor returned by an autograd collective must reach the loss on every rank (add
  `t.sum() * 0` when it is otherwise unused), or that rank skips the backward collective.

Byte counter: every collective adds, per tag, the bytes this rank sends and the bytes it
receives on the wire (for the autograd ones also those of the backward collective, counted
when the forward runs). Wire model, W ranks, S = bytes of the tensor this rank hands in:
- all-reduce: ring, sends and receives 2 (W-1)/W x S (reduce-scatter + all-gather phases);
- all-gather of m padded rows per rank: sends and receives (W-1) x m rows (exact); its
  backward reduce-scatter of the (W*m)-row gradient: (W-1) x m rows each way (ring);
- all-to-all: exactly the rows sent to / received from the other ranks (its backward: the
  same counts the other way round).
`comm_stats()` reads {tag: {"sent": bytes, "received": bytes}}, `reset_comm_stats()` clears
it (the trainer's LogHook does both at every log and reports bytes per optimizer step).
Single-process paths count nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

__all__ = [
    "rank",
    "world_size",
    "is_distributed",
    "barrier",
    "broadcast_object",
    "gloo_group",
    "all_reduce_sum",
    "all_reduce_count",
    "gather_sizes",
    "all_gather",
    "all_gather_detached",
    "all_to_all",
    "share_rows",
    "all_reduce_sum_identical",
    "global_mean",
    "comm_stats",
    "reset_comm_stats",
    "is_collective_failure",
    "publish_failure",
    "read_failure",
]

_BYTES: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # tag -> [sent, received]


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, timeout_s: float) -> Iterator[None]:
    """This process as ``rank`` of a gloo process group of ``world`` ranks for the block (the
    rendezvous from MASTER_ADDR / MASTER_PORT); destroyed on exit (launcher.run_gloo)."""
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        if dist.is_initialized():  # a command run inside may have closed it (cli.close_process_group)
            dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def comm_stats() -> dict[str, dict[str, int]]:
    """{tag: {"sent": bytes, "received": bytes}} of this rank since the last reset_comm_stats()
    (wire model in the module docstring)."""
    return {tag: {"sent": v[0], "received": v[1]} for tag, v in _BYTES.items()}


def reset_comm_stats() -> None:
    """Clear the per-tag byte counter (the trainer: at every log)."""
    _BYTES.clear()


def _count(tag: str, sent: float, received: float | None = None) -> None:
    v = _BYTES[tag]
    v[0] += int(round(sent))
    v[1] += int(round(sent if received is None else received))


def _ring(nbytes: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of `nbytes`."""
    w = world_size()
    return 2 * (w - 1) / w * nbytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _comm_device(like: torch.Tensor | None = None) -> torch.device:
    """Device for small bookkeeping tensors: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if like is not None:
        return like.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def _wait(t: torch.Tensor) -> torch.Tensor:
    """Turn a functional collective's AsyncCollectiveTensor into a plain tensor (keeps autograd)."""
    if isinstance(t, funcol.AsyncCollectiveTensor):
        return t.trigger_wait()
    return t


def all_reduce_sum(t: torch.Tensor, *, tag: str) -> torch.Tensor:
    """Sum of `t` over all ranks, returned as a new tensor (input untouched).

    With gradient: functional all_reduce, whose backward all-reduces (sums) the gradient,
    so each rank's input receives the sum over ranks of d(L_r)/d(sum). Used with a loss that
    is identical on every rank, that is W x the 1-process gradient, which DDP's 1/W
    averaging turns into the exact 1-process gradient.
    """
    if not is_distributed():
        return t
    if _needs_grad(t):
        _count(tag, 2 * _ring(_nbytes(t)))  # forward + backward all_reduce of the same size
        return _wait(funcol.all_reduce(t.contiguous(), "sum", dist.group.WORLD))
    out = t.detach().clone().contiguous()
    _count(tag, _ring(_nbytes(out)))
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _SumIdentical(torch.autograd.Function):
    """Forward: all-reduce(sum). Backward: W x the incoming gradient, no communication."""

    @staticmethod
    def forward(ctx, t):
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * world_size()


def all_reduce_sum_identical(t: torch.Tensor, *, tag: str) -> torch.Tensor:
    """all_reduce_sum for a result that reaches a loss IDENTICAL on every rank: the backward
    all-reduce is skipped.

    Why that is exact: every rank computes the same function L of the same reduced tensor
    s = sum_q t_q, so every rank's incoming gradient dL/ds is the same tensor g. The autograd
    all-reduce's backward would return sum_q g = W g to each rank; multiplying the local g by
    W gives that without moving a byte (the contract's W x the 1-process gradient, which DDP's
    1/W averaging turns back into the exact gradient). Wrong for a loss that differs per rank:
    use all_reduce_sum there.
    """
    if not is_distributed():
        return t
    _count(tag, _ring(_nbytes(t)))
    if _needs_grad(t):
        return _SumIdentical.apply(t)
    return _SumIdentical.forward(None, t)


def all_reduce_count(counts: int | Sequence[int] | torch.Tensor, *, tag: str,
                     device: torch.device | None = None) -> torch.Tensor:
    """Global sum of integer counts (int64 tensor, no gradient). Join with 0 when empty."""
    t = torch.as_tensor(counts, dtype=torch.int64)
    if not is_distributed():
        return t.to(device) if device is not None else t
    t = t.to(device if device is not None else _comm_device()).clone()
    _count(tag, _ring(_nbytes(t)))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_sizes(n: int, *, tag: str, device: torch.device | None = None) -> list[int]:
    """Every rank's `n`, in rank order ([n] in a single process)."""
    if not is_distributed():
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.int64,
                     device=device if device is not None else _comm_device())
    out = [torch.empty_like(t) for _ in range(world_size())]
    _count(tag, (world_size() - 1) * _nbytes(t))
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def _pad_rows(t: torch.Tensor, m: int) -> torch.Tensor:
    if t.shape[0] == m:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))], dim=0)


def _unpad(g: torch.Tensor, sizes: list[int], m: int) -> torch.Tensor:
    blocks = [g[r * m: r * m + s] for r, s in enumerate(sizes)]
    return torch.cat(blocks, dim=0)


def all_gather(t: torch.Tensor, *, tag: str, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (rank order); first-dim sizes may differ.

    Autograd-aware when `t` needs a gradient: the backward reduce-scatters (sums) the
    gradient of the gathered tensor over ranks, so this rank's rows receive the gradient
    every rank's loss sends them. Sizes are exchanged first (pass `sizes` from
    gather_sizes to skip that), rows are zero-padded to the largest size, gathered, and the
    padding removed. All ranks must call it, even with 0 rows.
    """
    if not is_distributed():
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], tag=tag, device=t.device)
    m = max(sizes)
    if m == 0:  # identical decision on every rank: nobody has rows
        return t[:0]
    padded = _pad_rows(t, m)  # (m, ...)
    if _needs_grad(t):
        # forward all_gather + backward reduce_scatter of the (W*m, ...) gradient
        _count(tag, 2 * (world_size() - 1) * _nbytes(padded))
        g = _wait(funcol.all_gather_single(padded, 0, dist.group.WORLD))  # (W*m, ...)
    else:
        _count(tag, (world_size() - 1) * _nbytes(padded))
        parts = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded.detach())
        g = torch.cat(parts, dim=0)
    return _unpad(g, sizes, m)


def all_gather_detached(t: torch.Tensor, *, tag: str,
                        sizes: list[int] | None = None) -> torch.Tensor:
    """all_gather of `t.detach()` (no gradient; for keys, ids, sort keys)."""
    with torch.no_grad():
        return all_gather(t.detach(), tag=tag, sizes=sizes)


def all_to_all(t: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], *,
               tag: str) -> torch.Tensor:
    """Rows t[sum(send_sizes[:q]) : ...+send_sizes[q]] go to rank q; returns the rows received,
    concatenated in source-rank order (recv_sizes[q] from rank q; both lists known on every
    rank, and recv_sizes[q] on this rank == send_sizes[this rank] on rank q).

    Autograd-aware (functional all_to_all_single): the backward sends each received row's
    gradient back to its owner, where it is summed into the sent row. Moves exactly the rows
    asked for: the way to move chosen rows without padding. All ranks must call it.
    """
    send_sizes, recv_sizes = [int(x) for x in send_sizes], [int(x) for x in recv_sizes]
    if sum(send_sizes) != t.shape[0]:
        raise ValueError(f"all_to_all: send sizes {send_sizes} do not add up to {t.shape[0]} rows")
    if not is_distributed():
        return t
    me = rank()
    row = math.prod(t.shape[1:]) * t.element_size()
    sent = (sum(send_sizes) - send_sizes[me]) * row
    recv = (sum(recv_sizes) - recv_sizes[me]) * row
    t = t.contiguous()
    if _needs_grad(t):
        _count(tag, sent + recv, recv + sent)  # backward: the same rows the other way round
        return _wait(funcol.all_to_all_single(t, recv_sizes, send_sizes, dist.group.WORLD))
    _count(tag, sent, recv)
    out = t.new_empty((sum(recv_sizes), *t.shape[1:]))
    dist.all_to_all_single(out, t.detach(), recv_sizes, send_sizes)
    return out


def share_rows(t: torch.Tensor, sizes: Sequence[int], *, tag: str) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (sizes[q] rows from rank q, known on
    every rank): an all-gather without padding, as an all-to-all. Autograd-aware like
    all_to_all (each owner receives the sum of the gradients every rank sends its rows).
    Received bytes: exactly the other ranks' rows."""
    if not is_distributed():
        return t
    w = world_size()
    if t.shape[0] != sizes[rank()]:
        raise ValueError(f"share_rows: rank {rank()} holds {t.shape[0]} rows, sizes say {sizes[rank()]}")
    if sum(sizes) == 0:
        return t[:0]
    return all_to_all(t.repeat(w, *([1] * (t.dim() - 1))), [t.shape[0]] * w, sizes, tag=tag)


def global_mean(local_sum: torch.Tensor, global_count: int | torch.Tensor) -> torch.Tensor:
    """The one place that owns the world-size factor: W * local_sum / global_count.

    Contract (docs/DISTRIBUTED.md, "The contract"): on W ranks, rank r returns L_r with mean_r L_r == L, the
    1-process loss on the concatenated batch, and d L_r / d x_r == W * dL/dx_r for its own
    inputs x_r, so DDP's gradient averaging (1/W sum over ranks) yields dL/dtheta exactly.

    Derivation. L = (sum over all items of l_i) / n, with n the global item count (reduced
    beforehand, a constant for autograd). With L_r = W * S_r / n, S_r the sum over this
    rank's items:
      mean_r L_r = (1/W) * sum_r W * S_r / n = (sum_r S_r) / n = L;
      d L_r / d x_r = W * dS_r/dx_r / n = W * dL/dx_r   (x_r enters only S_r);
      DDP: (1/W) sum_r dL_r/dtheta = sum_r dL/dx_r . dx_r/dtheta = dL/dtheta.
    This holds for uneven splits (2+1+1) because n is the global count; "DDP mean of
    local means" (L_r = S_r / n_r) is exact only when every n_r is equal.
    Only for items whose loss reads local inputs and detached / no-grad remote data; a loss
    built on autograd collectives that is identical on every rank must NOT be scaled (its
    backward collective already sums the W ranks' gradients).
    A zero global count returns local_sum * 0 (callers keep it connected to their inputs).
    """
    count = float(global_count)
    if count == 0:
        return local_sum * 0.0
    return local_sum * (world_size() / count)


# ---- failures: which rank failed first, and why (docs/OPERATIONS.md, "Faults") --------------------------
_COLLECTIVE_MARKERS = ("gloo/", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                       "NCCL", "ProcessGroup", "c10d", "Broken pipe")
_FAILURE_KEY = "blindseg/first_failure"


def is_collective_failure(err: BaseException) -> bool:
    """True when ``err`` is a collective that failed (a peer closed its connection or did not answer
    within the timeout), not an error of this rank's own work."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _COLLECTIVE_MARKERS)


def _store():
    if not is_distributed():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: nothing to publish or read
        return None


def publish_failure(info: dict) -> bool:
    """Record this rank's failure (``info``: rank, step, error, exit) in the process group's store
    unless another rank recorded one first; True when this one was recorded. Never raises."""
    import json

    store = _store()
    if store is None:
        return False
    try:
        value = json.dumps(info)
        return store.compare_set(_FAILURE_KEY, "", value).decode() == value
    except Exception:  # noqa: BLE001 - the store may be gone with its host
        return False


def read_failure() -> dict | None:
    """The first failure a rank recorded with :func:`publish_failure`, or None. Never raises."""
    import json

    store = _store()
    if store is None:
        return None
    try:
        if not store.check([_FAILURE_KEY]):
            return None
        return json.loads(store.get(_FAILURE_KEY).decode())
    except Exception:  # noqa: BLE001
        return None
