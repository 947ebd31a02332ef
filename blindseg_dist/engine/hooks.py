"""Everything periodic in training is a hook (docs/INTERFACES.md, "Training hooks").

A hook subclasses :class:`Hook` and overrides any of four methods (all no-ops by default). The
loop (``engine.trainer.TrainLoop``) sets ``hook.trainer`` when the hook is registered and calls
the methods on every rank, hook after hook in registration order:

- ``before_train()``: once, after set-up (model, optimizer, data stream, resume), before the
  first step.
- ``after_step()``: after every optimizer step that was taken; ``trainer.step`` already counts it.
  A skipped step (non-finite loss on some rank) calls nothing. When the ranks agreed to stop
  (a signal), ``trainer.stop_reason`` is already set during the last ``after_step``.
- ``after_train()``: once, when the loop has ended for any reason; ``trainer.stop_reason`` is
  "finished", "stopped by signal" or "stopped: N non-finite losses in a row ...". It runs inside
  the trainer's collective-failure guard (so do ``summarize`` and the trainer's close): collectives
  (the final checkpoint) belong here.
- ``summarize(summary)``: once, after that, with the run summary (a dict) to read or extend.

Rule for hooks with collectives (checkpoints, evaluation, the log all-reduce): decide from values
that are identical on every rank (the step, ``stop_reason``, all-reduced results), so that every
rank enters the same collectives in the same order (docs/DISTRIBUTED.md, "Pitfalls").

What a hook may read or call on its trainer: ``step``, ``max_steps``, ``stop_reason``, ``rank``,
``world``, ``is_main``, ``out_dir``, ``last`` (a :class:`StepOutput`), ``images_seen``,
``counters``, ``lr``, ``grad_norm``, ``grad_bytes``, ``net``, ``logger``, ``data_iter``, ``seconds``, ``last_checkpoint``,
``save_checkpoint()`` and ``evaluate()``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from tqdm import tqdm

from .. import atomic, dist
from ..data.location import load_location_manifest
from . import records
from .evaluate import format_table
from .logging import log_images


@dataclass
class StepOutput:
    """What the last optimizer step produced."""
    terms: dict[str, float]
    """Loss terms and "total" of this rank, averaged over the step's micro-batches."""
    batch: dict
    """The step's last micro-batch (as the loader yields it)."""
    out: dict
    """The objective's output on that micro-batch ("total", "terms", "logits", ...)."""


class ScalarWriter(Protocol):
    """Anything that takes the logged scalars: a RunLogger (TensorBoard), the progress bar, a file."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...


def every(step: int, n: int) -> bool:
    """True every ``n`` steps (never when ``n`` is 0)."""
    return n > 0 and step % n == 0


class Hook:
    """One duty of the training loop; see the module docstring for when each method runs."""

    trainer: Any = None

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def summarize(self, summary: dict[str, Any]) -> None:
        pass


class ProgressBar(Hook):
    """A tqdm bar on rank 0 (steps, loss, images/s, the share of time spent waiting for data); it
    also serves as a ScalarWriter of LogHook."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def before_train(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.max_steps, initial=t.step, desc="train", disable=not t.is_main,
                        dynamic_ncols=True, mininterval=2.0)

    def after_step(self) -> None:
        self.bar.update(1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        busy = values["time/data"] + values["time/step"]
        self.bar.set_postfix(loss=f"{values['loss/total']:.3f}", ips=f"{values['images_per_s']:.1f}",
                             data=f"{100 * values['time/data'] / busy if busy > 0 else 0.0:.0f}%")

    def after_train(self) -> None:
        self.bar.close()


class LogHook(Hook):
    """Every ``every`` steps and at the last step: the step's scalars to every writer.

    Scalars: ``loss/<term>`` (this step's terms averaged over ranks: one all-reduce), ``lr``,
    ``images_per_s`` (all ranks, since the previous log), ``time/data`` and ``time/step`` (this rank's
    seconds per optimizer step since the previous log: waiting for the loader, and the rest of the
    step; mmsegmentation's data_time and time minus data_time), ``faults/nonfinite_skipped``,
    ``faults/corrupt_shards``, ``comm_bytes/<tag>`` (bytes per optimizer step this rank received
    for each collective tag since the previous log; ``comm_bytes_sent/<tag>`` the bytes sent) and ``comm_bytes/gradient_allreduce`` (the gradient
    payload, 0 on one process). Writers are called on every rank; RunLogger writes on rank 0 only.
    """

    def __init__(self, every: int, writers: Sequence[ScalarWriter] = ()) -> None:
        self.every = every
        self.writers = list(writers)
        self.last: dict[str, float] = {}
        # since the previous log: its time, the trainer's images_seen then, optimizer steps taken,
        # the trainer's data and step seconds then
        self._t, self._images, self._steps = 0.0, 0, 0
        self._seconds = {"data": 0.0, "step": 0.0}

    def add_writer(self, writer: ScalarWriter) -> None:
        self.writers.append(writer)

    def before_train(self) -> None:
        self._t, self._images, self._steps = time.perf_counter(), self.trainer.images_seen, 0
        self._seconds = dict(self.trainer.seconds)
        dist.reset_comm_stats()

    def after_step(self) -> None:
        t = self.trainer
        self._steps += 1
        if every(t.step, self.every) or t.step == t.max_steps:
            self.last = self.collect()
            for writer in self.writers:
                writer.scalars(self.last, t.step)

    def collect(self) -> dict[str, float]:
        """The scalars of this step (a collective: every rank calls it at the same step)."""
        t = self.trainer
        now = time.perf_counter()
        names = sorted(t.last.terms)
        vals = dist.all_reduce_sum(torch.tensor([t.last.terms[k] for k in names], dtype=torch.float64), tag="log")
        scalars = {f"loss/{k}": float(v) / t.world for k, v in zip(names, vals)}
        scalars["lr"] = t.lr  # what the engine's optimizer uses
        if getattr(t, "grad_norm", None) is not None:
            scalars["grad_norm"] = float(t.grad_norm)  # of the last step, before clipping
        scalars.update(memory_scalars())
        scalars["images_per_s"] = (t.images_seen - self._images) / max(now - self._t, 1e-9)
        for k in ("data", "step"):
            scalars[f"time/{k}"] = (t.seconds[k] - self._seconds[k]) / max(self._steps, 1)
        scalars["faults/nonfinite_skipped"] = t.counters["nonfinite_skipped"]
        scalars["faults/corrupt_shards"] = t.counters["corrupt_shards"]
        # bytes per optimizer step, averaged since the last log, beside the gradient all-reduce payload
        # (bytes this rank receives, ring wire model of dist.py; the gradient all-reduce's payload
        # and its ring-received bytes 2 (W-1)/W x payload beside them)
        for tag, c in dist.comm_stats().items():
            scalars[f"comm_bytes/{tag}"] = c["received"] / self._steps
            scalars[f"comm_bytes_sent/{tag}"] = c["sent"] / self._steps
        scalars["comm_bytes/gradient_allreduce"] = t.grad_bytes if t.world > 1 else 0
        scalars["comm_bytes/gradient_allreduce_received"] = (
            2 * (t.world - 1) / t.world * t.grad_bytes if t.world > 1 else 0)
        dist.reset_comm_stats()
        self._t, self._images, self._steps = now, t.images_seen, 0
        self._seconds = dict(t.seconds)
        return scalars

    def summarize(self, summary: dict[str, Any]) -> None:
        summary["last_loss"] = self.last.get("loss/total")


def memory_scalars() -> dict[str, float]:
    """Peak memory of this process: resident set (MB) and, on a GPU, torch's peak allocation (MB)."""
    import resource

    out = {"memory/max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class MetricsFileHook(Hook):
    """DIR/metrics.jsonl (a row per logged step; a ScalarWriter of LogHook) and DIR/summary.csv
    (after each evaluation and at the end), on rank 0; engine/records.py has the formats. A
    resumed run first drops the rows after its resumed step."""

    def before_train(self) -> None:
        t = self.trainer
        if t.is_main:
            for name in (records.METRICS_FILE, records.EVAL_FILE):
                records.truncate_after(t.out_dir / name, t.step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.trainer.is_main:
            records.append_jsonl(self.trainer.out_dir / records.METRICS_FILE, records.metrics_row(step, values))

    def on_eval(self, step: int, results: dict) -> None:
        if self.trainer.is_main:
            records.write_summary_csv(self.trainer.out_dir)

    def summarize(self, summary: dict[str, Any]) -> None:
        if self.trainer.is_main:
            records.write_summary_csv(self.trainer.out_dir)


class ImageHook(Hook):
    """Every ``every`` steps: the panel input | augmented view | ground truth | prediction of the
    step's last micro-batch to TensorBoard (rank 0 only)."""

    def __init__(self, every: int, logger) -> None:
        self.every = every
        self.logger = logger

    def after_step(self) -> None:
        t = self.trainer
        if every(t.step, self.every):
            log_images(self.logger, t.last.batch, t.last.out["logits"], t.step)


class CheckpointHook(Hook):
    """Periodic: a checkpoint every ``every`` steps before the last one, unless the run is stopping.
    Final: one when the loop ends, whatever the reason (finished, a signal, non-finite losses),
    so that every stopped run can continue with ``--resume``."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self) -> None:
        t = self.trainer
        if every(t.step, self.every) and t.step < t.max_steps and t.stop_reason is None:
            t.save_checkpoint()

    def after_train(self) -> None:
        self.trainer.save_checkpoint()


EvalListener = Callable[[int, dict], None]


class EvalHook(Hook):
    """Evaluation of every eval.targets entry.

    Periodic: every ``every`` steps before the last one, unless the run is stopping. At the end:
    when ``at_end`` and the run finished, the results go into the summary (``summary["eval"]``) and
    DIR/eval.json, and rank 0 prints the table. After each evaluation every listener is called on
    every rank as ``listener(step, results)`` (results: target -> evaluate.target_result, identical
    on every rank).
    """

    def __init__(self, every: int, *, at_end: bool, listeners: Sequence[EvalListener] = ()) -> None:
        self.every = every
        self.at_end = at_end
        self.listeners = list(listeners)

    def add_listener(self, listener: EvalListener) -> None:
        self.listeners.append(listener)

    def evaluate(self) -> dict[str, dict]:
        results = self.trainer.evaluate()
        for listener in self.listeners:
            listener(self.trainer.step, results)
        return results

    def after_step(self) -> None:
        t = self.trainer
        if every(t.step, self.every) and t.step < t.max_steps and t.stop_reason is None:
            self.evaluate()

    def summarize(self, summary: dict[str, Any]) -> None:
        t = self.trainer
        if not (self.at_end and t.stop_reason == "finished"):
            return
        results = self.evaluate()
        summary["eval"] = {"world_size": t.world, "targets": results}
        if t.is_main:
            atomic.write_json(t.out_dir / "eval.json", summary["eval"], indent=1)
            print(format_table(results))


class BestCheckpointHook(Hook):
    """A listener of EvalHook: after every evaluation, rank 0 appends a row to DIR/eval.jsonl; when the
    selection target's mIoU is the best so far, that step's checkpoint (written now if the step has
    none) becomes the best: DIR/best.json names it, and ``trainer.protected`` keeps it from
    keep_last until a better one replaces it. ``selection`` None: rows only, no best checkpoint.
    ``unseen``: the selection target is an unseen one (labelled in eval.jsonl and best.json).
    The decision uses all-reduced results, identical on every rank (the save is collective)."""

    def __init__(self, selection: str | None, unseen: bool = False, *, announce: bool = True) -> None:
        self.selection, self.unseen, self.announce = selection, unseen, announce
        self.best: dict[str, Any] | None = None

    def before_train(self) -> None:
        t = self.trainer
        f = t.out_dir / "best.json"
        if f.is_file():  # a resumed run: keep the best of its earlier part
            best = json.loads(f.read_text())
            if best.get("step", 0) <= t.step and Path(best["checkpoint"]).is_dir():
                self.best = best
                t.protected = [Path(best["checkpoint"])]
        if not (t.is_main and self.announce):
            return
        if self.selection is None:
            print("[train] no held-out source target among eval.targets: no best checkpoint is kept "
                  "(set eval.selection to select on a target; an unseen one is labelled as such)", flush=True)
        elif self.unseen:
            print(f"[train] eval.selection={self.selection} is an UNSEEN target: the best checkpoint is "
                  "selected on test data (labelled in eval.jsonl, best.json and reports)", flush=True)

    def on_eval(self, step: int, results: dict[str, dict]) -> None:
        t = self.trainer
        if t.is_main:
            records.append_jsonl(t.out_dir / records.EVAL_FILE,
                                 records.eval_row(step, results, self.selection, self.unseen))
        if self.selection is None or self.selection not in results:
            return
        miou = results[self.selection]["miou"]
        if miou != miou or (self.best is not None and miou <= self.best["miou"]):  # NaN or not better
            return
        last = t.last_checkpoint
        path = last if last is not None and last.name == str(step) else t.save_checkpoint()
        self.best = {"step": step, "checkpoint": str(path), "selection": self.selection, "miou": miou,
                     "selection_is_unseen_target": self.unseen}
        t.protected = [Path(path)]
        if t.is_main:
            atomic.write_json(t.out_dir / "best.json", self.best, indent=1)

    def summarize(self, summary: dict[str, Any]) -> None:
        if self.best is not None:
            summary["best"] = dict(self.best)


def stream_record(manifest_dir: str | Path, keys: list[list[str]], net: torch.nn.Module, rank: int) -> dict:
    """What a rank streamed (sample keys per micro-batch, their shards) and a hash of its weights."""
    shard_of = {s["key"]: s["shard"] for s in (load_location_manifest(str(manifest_dir)) or {}).get("samples", [])}
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"rank": rank, "keys": keys, "shards": sorted({shard_of.get(k, "?") for b in keys for k in b}),
            "params_sha256": h.hexdigest()}


class StreamRecordHook(Hook):
    """run.record_stream: DIR/streamed-rank<r>.json with the keys of every micro-batch this rank drew
    (those of skipped steps too), their shards, and a hash of the final weights."""

    def __init__(self, manifest_dir: str | Path) -> None:
        self.manifest_dir = manifest_dir
        self.keys: list[list[str]] = []

    def before_train(self) -> None:
        self.trainer.data_iter = self._recording(self.trainer.data_iter)

    def _recording(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.keys.append(list(batch["keys"]))
            yield batch

    def summarize(self, summary: dict[str, Any]) -> None:
        t = self.trainer
        record = stream_record(self.manifest_dir, self.keys, t.net, t.rank)
        atomic.write_json(t.out_dir / f"streamed-rank{t.rank}.json", record)


class SummaryHook(Hook):
    """Rank 0 writes DIR/summary.json (the summary without "eval") and prints the closing line.
    Register it last: it writes what the hooks before it added."""

    def summarize(self, summary: dict[str, Any]) -> None:
        t = self.trainer
        if t.is_main:
            atomic.write_json(t.out_dir / "summary.json", {k: v for k, v in summary.items() if k != "eval"}, indent=1)
            print(f"[train] {t.stop_reason} at step {t.step} in {summary['seconds']:.0f} s; "
                  f"checkpoint {t.last_checkpoint}", flush=True)
