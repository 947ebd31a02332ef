"""The run's records: metrics.jsonl, eval.jsonl, summary.csv and the best checkpoint (engine/records.py,
hooks.BestCheckpointHook, hooks.MetricsFileHook). The best-checkpoint hook is driven in isolation by a
fake trainer over the real checkpoint writer; one real 1-process training checks the files it leaves."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from blindseg_dist.config import load_config
from blindseg_dist.engine import checkpoint as ckpt
from blindseg_dist.engine import records
from blindseg_dist.engine.evaluate import selection_target
from blindseg_dist.engine.hooks import BestCheckpointHook, MetricsFileHook
from tests.engine._engine_runs import PY, ROOT, TINY, env, run, tail


class FakeTrainer:
    """What the two hooks read: a run folder, the step, and a checkpoint writer (the real one, keep_last=1)."""

    def __init__(self, out: Path):
        self.out_dir, self.step, self.is_main = out, 0, True
        self.last_checkpoint, self.protected = None, []

    def save_checkpoint(self) -> Path:
        self.last_checkpoint = ckpt.save_checkpoint(self.out_dir, self.step, model_state={"w": torch.zeros(1)},
                                                    state={}, keep_last=1, meta={"run_id": "r"},
                                                    protect=self.protected)
        return self.last_checkpoint


def result(miou: float) -> dict:
    return {"miou": miou, "protocol": "full", "per_class_iou": {"road": miou}, "confusion_matrix": [[1]]}


def test_best_checkpoint_survives_keep_last_and_moves_when_beaten(tmp_path):
    t = FakeTrainer(tmp_path)
    best, files = BestCheckpointHook("source"), MetricsFileHook()
    for h in (best, files):
        h.trainer = t
        h.before_train()
    for step, miou in enumerate([0.3, 0.6, 0.5, 0.4, 0.2], 1):
        t.step = step
        if step % 2:  # periodic checkpoints at odd steps only: the best's step 2 is saved by the hook
            t.save_checkpoint()
        files.scalars({"loss/total": 1.0 / step, "lr": 0.01}, step)
        best.on_eval(step, {"source": result(miou), "night": result(miou / 2)})
        files.on_eval(step, {})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["2", "5"]  # keep_last=1 + the best
    info = json.loads((tmp_path / "best.json").read_text())
    assert info == {"step": 2, "checkpoint": str(tmp_path / "checkpoints" / "2"), "selection": "source",
                    "miou": 0.6, "selection_is_unseen_target": False}
    rows = records.read_jsonl(tmp_path / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[1]["targets"]["night"]["miou"] == 0.3
    assert "confusion_matrix" not in rows[0]["targets"]["source"]
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["step"] for r in table] == ["1", "2", "3", "4", "5"] and table[1]["miou/source"] == "0.6"
    assert set(table[0]) == {"step", "lr", "loss/total", "miou/source", "miou/night"}
    t.step = 6
    best.on_eval(6, {"source": result(0.9)})  # beaten: step 6 is saved and becomes the best
    t.step = 7
    t.save_checkpoint()  # the old best (2) is no longer protected: keep_last removes it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["6", "7"]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 6


def test_resumed_metrics_drop_rows_after_the_resumed_step(tmp_path):
    for s in (1, 2, 3, 4):
        records.append_jsonl(tmp_path / "metrics.jsonl", {"step": s, "loss/total": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a writer killed mid-line
    records.truncate_after(tmp_path / "metrics.jsonl", 2)
    assert records.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss/total": None},
                                                              {"step": 2, "loss/total": None}]


def test_selection_defaults_to_the_held_out_source_and_labels_unseen(train_shards, tmp_path):
    night = tmp_path / "night"
    night.mkdir()
    (night / "manifest.json").write_text(json.dumps({"dataset": "cityscapes"}))
    held_out = tmp_path / "val"
    held_out.mkdir()
    (held_out / "manifest.json").write_text((Path(train_shards) / "manifest.json").read_text())
    cfg = load_config(ROOT / "configs/demo.yaml", [f"eval.targets={{night: {night}, val: {held_out}}}"])
    assert selection_target(cfg.eval, train_shards) == ("val", False)  # same dataset as data.train
    cfg.eval.selection = "night"
    assert selection_target(cfg.eval, train_shards) == ("night", True)
    cfg = load_config(ROOT / "configs/demo.yaml", [f"eval.targets={{night: {night}}}"])
    assert selection_target(cfg.eval, train_shards) == (None, False)


def test_training_writes_metrics_eval_records_and_keeps_the_best(train_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "-m", "blindseg_dist", "train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(out),
           "--max-steps", "3", f"data.train={train_shards}", *TINY, "eval.at_end=true", "eval.every=1",
           "eval.max_images=2", f"eval.targets={{source: {train_shards}}}", "run.checkpoint_every=1",
           "run.keep_last=1"]
    res = run(cmd, env())
    assert res.returncode == 0, tail(res)
    metrics = records.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in ("loss/total", "loss/ce", "loss/cwcl", "lr", "grad_norm", "images_per_s", "memory/max_rss_mb",
                    "time"):
            assert isinstance(m[key], float) and m[key] >= 0, (key, m)
        assert m["time/data"] >= 0 and m["time/step"] > 0, m  # seconds per step: loader wait, compute
    assert metrics[0]["lr"] > metrics[1]["lr"] > metrics[2]["lr"] == 0  # the poly schedule, 0 at the end
    evals = records.read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [1, 2, 3] and all(e["selection"] == "source" for e in evals)
    assert all(0 <= e["targets"]["source"]["miou"] <= 1 for e in evals)
    best = json.loads((out / "best.json").read_text())
    top = max(evals, key=lambda e: e["targets"]["source"]["miou"])  # first of equals, as the hook
    assert best["step"] == top["step"] and Path(best["checkpoint"]).is_dir()
    names = {p.name for p in ckpt.list_checkpoints(out)}
    # keep_last=1 plus the best (a best replaced at the very end stays until the next save would prune it)
    assert {"3", str(best["step"])} <= names and len(names) <= 2, names
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["step"] for r in table] == ["1", "2", "3"] and "miou/source" in table[0] and "grad_norm" in table[0]
    assert json.loads((out / "summary.json").read_text())["best"]["step"] == best["step"]


def test_log_with_names_accelerate_trackers(tmp_path):
    """run.log_with goes through accelerate's trackers: tensorboard writes DIR/tb; an unknown name is a
    config error at load time, a known tracker that is not installed one when the logger starts."""
    import pytest
    from accelerate.tracking import get_available_trackers

    from blindseg_dist.config import ConfigError
    from blindseg_dist.engine.logging import RunLogger

    with pytest.raises(ConfigError, match="run.log_with"):
        load_config(ROOT / "configs/demo.yaml", ["run.log_with=[tensorboard, nosuch]"])
    logger = RunLogger(tmp_path / "tb", enabled=True, log_with=["tensorboard"])
    assert [t.name for t in logger.trackers] == ["tensorboard"] and logger.writer is not None
    logger.scalars({"loss/total": 1.0}, 1)
    logger.close()
    assert list((tmp_path / "tb").glob("events.*"))
    missing = [n for n in ("wandb", "mlflow", "aim") if n not in {str(t) for t in get_available_trackers()}]
    assert missing, "wandb, mlflow and aim are not dependencies of the project"
    with pytest.raises(ConfigError, match=f"'{missing[0]}' is not installed"):
        RunLogger(tmp_path / "tb2", enabled=True, log_with=["tensorboard", missing[0]])
