"""The training loop's hooks in isolation: a fake step (no model) drives the real hooks, and a hook
records every call, checking order and periodicity (log, checkpoint periodic / final / on signal,
evaluation, summary), skipped steps and the exits. One test runs the real Trainer with a recording
hook (1 process, tiny shards, a non-finite loss injected at one step)."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from blindseg_dist.engine.hooks import (CheckpointHook, EvalHook, Hook, ImageHook, LogHook, ProgressBar, StepOutput,
                                        SummaryHook, every)
from blindseg_dist.engine.trainer import EXIT_NONFINITE, TrainLoop
from tests.engine._engine_runs import PY, ROOT, TINY, env, tail


class FakeLoop(TrainLoop):
    """Steps without a model. ``skip_at``: attempts whose loss is "non-finite" (skipped);
    ``signal_at``: the step during which the process sends itself SIGTERM; ``nonfinite_stop_at``:
    the attempt at which the run stops for non-finite losses. Every duty a hook asks of it is
    appended to ``events`` (shared with the recording hook and the writers)."""

    def __init__(self, out_dir: Path, max_steps: int, events: list, *, skip_at=(), signal_at=None,
                 nonfinite_stop_at=None):
        super().__init__(max_steps=max_steps)
        self.out_dir, self.events = out_dir, events
        self.skip_at, self.signal_at, self.nonfinite_stop_at = set(skip_at), signal_at, nonfinite_stop_at
        self.attempt, self.images_seen, self.lr, self.grad_bytes = 0, 0, 0.01, 0
        self.counters = {"nonfinite_skipped": 0, "corrupt_shards": 0}
        self.last = None
        self.closed = False

    def train_step(self) -> bool:
        attempt, self.attempt = self.attempt, self.attempt + 1
        if self.step == self.signal_at:
            signal.raise_signal(signal.SIGTERM)  # what a scheduler's preemption does
        self.images_seen += 4
        if attempt == self.nonfinite_stop_at:
            self.stop_reason = "stopped: 2 non-finite losses in a row (run.max_nonfinite)"
        if attempt in self.skip_at or attempt == self.nonfinite_stop_at:
            self.counters["nonfinite_skipped"] += 1
            return False
        self.step += 1
        logits = torch.zeros(1, 19, 8, 8)
        self.last = StepOutput(terms={"total": float(self.step), "ce": 0.5}, batch={
            "image": torch.zeros(1, 3, 8, 8), "label": torch.zeros(1, 8, 8, dtype=torch.long)},
            out={"logits": logits})
        if self.signal.requested:
            self.stop_reason = "stopped by signal"
        return True

    def save_checkpoint(self) -> Path:
        self.events.append(("checkpoint", self.step, self.stop_reason))
        self.last_checkpoint = self.out_dir / "checkpoints" / str(self.step)
        return self.last_checkpoint

    def evaluate(self) -> dict:
        self.events.append(("evaluate", self.step))
        return {"night": {"miou": 0.25, "per_class_iou": {}}}

    def close(self) -> None:
        self.closed = True


class Recorder(Hook):
    def __init__(self, events: list):
        self.events = events

    def before_train(self):
        self.events.append(("before_train", self.trainer.step))

    def after_step(self):
        self.events.append(("after_step", self.trainer.step))

    def after_train(self):
        self.events.append(("after_train", self.trainer.step, self.trainer.stop_reason))

    def summarize(self, summary):
        self.events.append(("summarize", summary["steps"], summary["stop_reason"]))


class Writer:
    def __init__(self, events: list):
        self.events, self.values = events, {}

    def scalars(self, values, step):
        self.events.append(("log", step))
        self.values[step] = values


class FakeLogger:
    """Stands in for RunLogger on rank 0 (log_images needs a writer)."""

    def __init__(self, events: list):
        self.events, self.writer = events, object()

    def image(self, tag, image, step):
        self.events.append(("image", step, image.shape))


def run_loop(tmp_path, max_steps, *, log=3, ckpt=2, ev=3, image=0, at_end=True, **fake):
    events: list = []
    loop = FakeLoop(tmp_path, max_steps, events, **fake)
    writer = Writer(events)
    listened: list = []
    loop.register_hooks([Recorder(events), ProgressBar(), LogHook(log, writers=[writer]),
                         ImageHook(image, FakeLogger(events)), CheckpointHook(ckpt),
                         EvalHook(ev, at_end=at_end, listeners=[lambda step, res: listened.append(step)]),
                         SummaryHook()])
    return loop, events, writer, listened


def of(events, kind):
    return [e[1:] for e in events if e[0] == kind]


def test_every():
    assert [s for s in range(1, 10) if every(s, 3)] == [3, 6, 9]
    assert not any(every(s, 0) for s in range(10))  # 0: off


def test_order_and_periodicity_of_a_finished_run(tmp_path):
    loop, events, writer, listened = run_loop(tmp_path, 7, image=4)
    summary = loop.train()
    assert events[0] == ("before_train", 0)
    assert of(events, "after_step") == [(s,) for s in range(1, 8)]
    assert of(events, "log") == [(3,), (6,), (7,)]  # every 3 and the last step
    assert of(events, "checkpoint") == [(2, None), (4, None), (6, None), (7, "finished")]  # every 2, then final
    assert of(events, "evaluate") == [(3,), (6,), (7,)]  # every 3 (not at 7 = max_steps), then at the end
    assert listened == [3, 6, 7]
    assert of(events, "image") == [(4, (8, 3 * 8 + 2 * 2, 3))]  # image_every=4: step 4 only; one panel row
    # within a step: after_step of earlier hooks first, then log, checkpoint, evaluation
    i = events.index(("after_step", 6))
    assert events[i:i + 4] == [("after_step", 6), ("log", 6), ("checkpoint", 6, None), ("evaluate", 6)]
    # the end: after_train (final checkpoint), then summarize (evaluation at the end, summary)
    tail_events = events[events.index(("after_train", 7, "finished")):]
    assert tail_events == [("after_train", 7, "finished"), ("checkpoint", 7, "finished"),
                           ("summarize", 7, "finished"), ("evaluate", 7)]
    assert loop.closed and summary["stop_reason"] == "finished" and summary["steps"] == 7
    assert summary["last_loss"] == 7.0  # the last logged loss/total (one process: the step's own)
    assert summary["eval"] == {"world_size": 1, "targets": {"night": {"miou": 0.25, "per_class_iou": {}}}}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps"] == 7 and "eval" not in on_disk and on_disk["last_loss"] == 7.0
    assert json.loads((tmp_path / "eval.json").read_text()) == summary["eval"]
    assert writer.values[6]["loss/ce"] == 0.5 and writer.values[6]["lr"] == 0.01
    assert writer.values[6]["images_per_s"] > 0 and writer.values[7]["faults/nonfinite_skipped"] == 0


def test_skipped_steps_call_no_hooks_but_count(tmp_path):
    loop, events, writer, _ = run_loop(tmp_path, 4, log=2, ckpt=0, ev=0, skip_at={1, 2})
    summary = loop.train()
    assert of(events, "after_step") == [(1,), (2,), (3,), (4,)]  # each taken step once, in order
    assert loop.attempt == 6 and summary["steps"] == 4
    assert of(events, "checkpoint") == [(4, "finished")]  # checkpoint_every=0: the final one only
    assert of(events, "evaluate") == [(4,)]  # eval.every=0: only at the end
    assert writer.values[2]["faults/nonfinite_skipped"] == 2
    # images of the skipped attempts count toward the throughput of their log interval
    assert loop.images_seen == 24


def test_signal_stops_after_the_step_with_one_checkpoint(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    loop, events, writer, listened = run_loop(tmp_path, 10, log=2, ckpt=2, ev=2, image=2, signal_at=3)
    summary = loop.train()  # a clean return: exit code 0
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    assert summary["stop_reason"] == "stopped by signal" and summary["steps"] == 4
    assert of(events, "after_step") == [(1,), (2,), (3,), (4,)]
    # step 4 is still logged and imaged; its periodic checkpoint and evaluation are not run: the
    # on-signal checkpoint of after_train saves step 4, and a stopped run is not evaluated at its end
    assert of(events, "log") == [(2,), (4,)] and [e[0] for e in of(events, "image")] == [2, 4]
    assert of(events, "checkpoint") == [(2, None), (4, "stopped by signal")]
    assert of(events, "evaluate") == [(2,)] and listened == [2]
    assert "eval" not in summary and not (tmp_path / "eval.json").exists()


def test_nonfinite_stop_exits_3_after_the_final_checkpoint_and_summary(tmp_path):
    loop, events, _, _ = run_loop(tmp_path, 10, nonfinite_stop_at=3)
    with pytest.raises(SystemExit) as e:
        loop.train()
    assert e.value.code == EXIT_NONFINITE
    assert of(events, "after_step") == [(1,), (2,), (3,)]
    assert of(events, "checkpoint") == [(2, None), (3, "stopped: 2 non-finite losses in a row (run.max_nonfinite)")]
    assert of(events, "evaluate") == [(3,)]  # the periodic one (ev=3); none at the end of a stopped run
    assert json.loads((tmp_path / "summary.json").read_text())["stop_reason"].startswith("stopped: 2 non-finite")
    assert loop.closed


def test_an_error_in_a_single_process_propagates(tmp_path):
    class Broken(FakeLoop):
        def train_step(self):
            raise RuntimeError("boom")

    events: list = []
    loop = Broken(tmp_path, 3, events)
    loop.register_hooks([Recorder(events), CheckpointHook(1)])
    with pytest.raises(RuntimeError, match="boom"):
        loop.train()
    assert events == [("before_train", 0)]  # no final checkpoint after a failure


def test_resumed_loop_starts_at_its_step(tmp_path):
    events: list = []
    loop = FakeLoop(tmp_path, 5, events)
    loop.step = 3  # what Trainer does after loading a checkpoint of step 3
    loop.register_hooks([Recorder(events), CheckpointHook(2)])
    loop.train()
    assert of(events, "after_step") == [(4,), (5,)] and of(events, "checkpoint") == [(4, None), (5, "finished")]


PROBE = """
import json, sys
from blindseg_dist.config import load_config
from blindseg_dist.engine.hooks import Hook
from blindseg_dist.engine.trainer import Trainer

class Recorder(Hook):
    def __init__(self):
        self.calls = []
    def before_train(self):
        self.calls.append(["before_train", self.trainer.step])
    def after_step(self):
        self.calls.append(["after_step", self.trainer.step, self.trainer.attempt,
                           sorted(self.trainer.last.terms)])
    def after_train(self):
        self.calls.append(["after_train", self.trainer.step, self.trainer.stop_reason,
                           self.trainer.last_checkpoint.name])
    def summarize(self, summary):
        self.calls.append(["summarize", summary["steps"], summary["counters"]])

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
rec = Recorder()
trainer.register_hooks([rec])
trainer.train()
print("CALLS " + json.dumps(rec.calls))
"""


def test_real_trainer_calls_a_registered_hook(train_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "-c", PROBE, str(ROOT / "configs/demo.yaml"), f"data.train={train_shards}", f"run.output_dir={out}",
           "optim.max_steps=3", "run.checkpoint_every=2", "run.log_every=2", *TINY]
    res = subprocess.run(cmd, env=env(BLINDSEG_FAULT_NAN="1"), cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, tail(res)
    calls = json.loads(res.stdout.split("CALLS ", 1)[1])
    terms = ["aux", "ccl", "ce", "ce_aug", "cml", "cwcl", "sdcl", "total"]
    # attempt 1 is non-finite: skipped on every rank, no after_step; steps 1..3 in attempts 1, 3, 4
    assert calls == [["before_train", 0], ["after_step", 1, 1, terms], ["after_step", 2, 3, terms],
                     ["after_step", 3, 4, terms], ["after_train", 3, "finished", "3"],
                     ["summarize", 3, {"nonfinite_skipped": 1, "corrupt_shards": 0}]]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert "step 1: non-finite loss, step skipped (1 in a row)" in res.stdout


class SlowDataLoop(FakeLoop):
    """FakeLoop whose batches take ``data_s`` to arrive and whose steps compute for ``step_s``."""

    def __init__(self, *a, data_s: float, step_s: float, **k):
        super().__init__(*a, **k)
        self.data_s, self.step_s = data_s, step_s

        def slow_batches():
            while True:
                time.sleep(self.data_s)
                yield {}

        self.data_iter = slow_batches()

    def train_step(self) -> bool:
        self.next_batch()
        time.sleep(self.step_s)
        return super().train_step()


def test_log_records_data_and_step_time_to_files_bar_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from blindseg_dist.engine.logging import RunLogger

    events: list = []
    loop = SlowDataLoop(tmp_path, 4, events, data_s=0.06, step_s=0.02)
    writer, bar, tb = Writer(events), ProgressBar(), RunLogger(tmp_path / "tb", enabled=True)
    loop.register_hooks([bar, LogHook(2, writers=[writer, bar, tb])])
    loop.train()
    tb.close()
    for step in (2, 4):
        v = writer.values[step]
        assert 0.06 <= v["time/data"] < 0.06 + 0.05, v  # seconds per step waiting for the loader
        assert 0.02 <= v["time/step"] < 0.02 + 0.05, v  # the rest of the step
    share = float(bar.bar.postfix.split("data=")[1].split("%")[0])  # 0.06 / 0.08: 75% waiting for data
    assert 55 <= share <= 80, bar.bar.postfix
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"time/data", "time/step"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("time/data")] == [2, 4]
