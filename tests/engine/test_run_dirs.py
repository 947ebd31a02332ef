"""Run folders (engine/rundir.py): a new timestamped folder per run by default, refusal to train into
a folder holding checkpoints without --resume, --resume [PATH], a resume that has nothing to train or
changes the batch/schedule stops and touches nothing, and keep_last never deletes or replaces a
checkpoint of another run. Training runs are real 1-process runs of `blindseg train` (tiny model)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from blindseg_dist import cli
from blindseg_dist.engine import checkpoint as ckpt
from tests.engine._engine_runs import PY, ROOT, TINY, env, run, summary, tail

DEMO = str(ROOT / "configs/demo.yaml")


def train_args(train_shards, steps, *extra, out: Path | None = None) -> list[str]:
    args = ["train", "--config", DEMO, "--max-steps", str(steps), f"data.train={train_shards}", *TINY,
            "run.checkpoint_every=1", "run.keep_last=2", *extra]
    return args + (["--output-dir", str(out)] if out else [])


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (what "touches nothing" is checked against)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(train_shards, tmp_path_factory):
    """A finished 2-step run (checkpoints 1 and 2) in a folder of its own; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = run([PY, "-m", "blindseg_dist", *train_args(train_shards, 2, out=out)], env())
    assert res.returncode == 0, tail(res)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_training_into_a_folder_with_checkpoints_is_refused(trained, train_shards, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    before = snapshot(out)
    rc = cli.main(train_args(train_shards, 3, out=out))
    err = capsys.readouterr().err
    assert rc == 2 and "already holds checkpoints of a run (steps 1, 2)" in err and "--resume" in err, err
    assert snapshot(out) == before  # config.yaml, summary.json, checkpoints: untouched


def test_resume_with_nothing_to_train_touches_nothing(trained, train_shards, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    before = snapshot(out)
    for steps in (2, 1):  # at and below the checkpoint's step
        rc = cli.main([*train_args(train_shards, steps, out=out), "--resume", "--allow-changed", "optim.max_steps"])
        err = capsys.readouterr().err
        assert rc == 2 and "the checkpoint is at step 2" in err and "nothing to train" in err, err
    assert snapshot(out) == before
    assert (out / "checkpoints" / "2" / "rng-0.pt").is_file()


def test_resume_that_changes_batch_or_schedule_is_refused_unless_allowed(trained, train_shards, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    before = snapshot(out)
    rc = cli.main([*train_args(train_shards, 3, "data.batch_size=4", out=out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.batch_size 2 -> 4" in err and "optim.max_steps 2 -> 3" in err, err
    assert "--allow-changed data.batch_size optim.max_steps" in err
    rc = cli.main([*train_args(train_shards, 3, out=out), "--resume", "--allow-changed", "world_size"])
    err = capsys.readouterr().err
    assert rc == 2 and "optim.max_steps 2 -> 3" in err and "data.batch_size" not in err, err
    rc = cli.main([*train_args(train_shards, 3, out=out), "--resume", "--allow-changed", "colour"])
    assert rc == 2 and "not a resume key" in capsys.readouterr().err
    assert snapshot(out) == before
    # allowed: continues the same run (same run id, so keep_last=2 prunes its checkpoints). Checkpoint 2 is
    # removed first, as if the run had been killed while writing it: the resume from 1 trains step 2 again
    import shutil

    shutil.rmtree(out / "checkpoints" / "2")
    res = run([PY, "-m", "blindseg_dist", *train_args(train_shards, 3, out=out), "--resume",
               "--allow-changed", "optim.max_steps"], env())
    assert res.returncode == 0, tail(res)
    assert f"resumed from {out / 'checkpoints' / '1'} at step 1" in res.stdout
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["2", "3"] and summary(out)["steps"] == 3
    ids = {ckpt.run_id_of(p) for p in ckpt.list_checkpoints(out)}
    assert len(ids) == 1 and None not in ids
    # the continued records: every step once in metrics.jsonl and in TensorBoard (step 2's first rows dropped)
    from blindseg_dist.engine.records import read_jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    events = EventAccumulator(str(out / "tb")).Reload()
    assert sorted(e.step for e in events.Scalars("loss/total")) == [1, 2, 3]


def test_resume_from_an_older_checkpoint_or_into_another_run_is_refused(trained, train_shards, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    other = copy_run(trained, tmp_path / "other")
    before = snapshot(out), snapshot(other)
    rc = cli.main([*train_args(train_shards, 3, "--allow-changed", "optim.max_steps"), "--resume",
                   str(out / "checkpoints" / "1")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds later checkpoints (steps 1, 2)" in err, err
    rc = cli.main([*train_args(train_shards, 3, "--allow-changed", "optim.max_steps", out=other), "--resume",
                   str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds checkpoints of another run" in err, err
    rc = cli.main([*train_args(train_shards, 3), "--resume", str(tmp_path)])
    assert rc == 2 and "neither a checkpoint folder" in capsys.readouterr().err
    assert (snapshot(out), snapshot(other)) == before


def test_default_run_folder_and_resume_of_the_newest_run(train_shards, tmp_path):
    e = env()
    res = run([PY, "-m", "blindseg_dist", *train_args(train_shards, 1, "run.name=tiny")], e, cwd=tmp_path)
    assert res.returncode == 0, tail(res)
    (first,) = (tmp_path / "runs" / "tiny").iterdir()
    assert len(first.name) == len("20261202-013000") and (first / "checkpoints" / "1").is_dir()
    # --resume alone, no output folder: continues the newest run of that name (a branch would be new)
    res = run([PY, "-m", "blindseg_dist", *train_args(train_shards, 2, "run.name=tiny"), "--resume",
               "--allow-changed", "optim.max_steps"], e, cwd=tmp_path)
    assert res.returncode == 0, tail(res)
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == [first.name]
    assert summary(first)["steps"] == 2 and f"output {Path('runs') / 'tiny' / first.name}" in res.stdout
    # --resume PATH into a new folder branches: a new run id, the source run untouched
    before = snapshot(first)
    branch = tmp_path / "branch"
    res = run([PY, "-m", "blindseg_dist", *train_args(train_shards, 3, out=branch), "--resume",
               str(first / "checkpoints" / "1"), "--allow-changed", "optim.max_steps"], e, cwd=tmp_path)
    assert res.returncode == 0, tail(res)
    assert f"resumed from {first / 'checkpoints' / '1'} at step 1" in res.stdout
    assert snapshot(first) == before
    assert [p.name for p in ckpt.list_checkpoints(branch)] == ["2", "3"]
    assert ckpt.run_id_of(branch / "checkpoints" / "3") != ckpt.run_id_of(first / "checkpoints" / "2")


def _save(out: Path, step: int, run_id: str, keep_last: int = 1, protect=()) -> Path:
    return ckpt.save_checkpoint(out, step, model_state={"w": torch.full((2,), float(step))}, state={},
                                keep_last=keep_last, meta={"run_id": run_id}, protect=protect)


def test_keep_last_touches_only_this_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2):
        _save(out, step, "a", keep_last=5)
    for step in (3, 4):
        _save(out, step, "b")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["1", "2", "4"]  # b keeps 1 of its own
    before = snapshot(out / "checkpoints" / "2")
    with pytest.raises(RuntimeError, match="written by another run"):
        _save(out, 2, "b")
    assert snapshot(out / "checkpoints" / "2") == before
    _save(out, 5, "b", protect=[out / "checkpoints" / "4"])
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["1", "2", "4", "5"]
    assert json.loads((out / "checkpoints" / "5" / "meta.json").read_text()) == {"run_id": "b", "step": 5}


def test_two_processes_agree_on_the_default_run_folder(train_shards, tmp_path):
    """Rank 0's timestamped folder is broadcast: both ranks write into one runs/<name>/<timestamp>/."""
    from tests.engine._engine_runs import train_cmd

    cmd = train_cmd(tmp_path / "unused", train_shards, 1, "run.name=two")
    i = cmd.index("--output-dir")
    del cmd[i:i + 2]  # no output folder: the default
    res = run(cmd, env(), cwd=tmp_path)
    assert res.returncode == 0, tail(res)
    (folder,) = (tmp_path / "runs" / "two").iterdir()
    assert summary(folder)["world_size"] == 2
    assert sorted(p.name for p in (folder / "checkpoints" / "1").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert not (tmp_path / "unused").exists()
