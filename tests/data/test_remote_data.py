"""Evaluation (and training) data from remote locations equal the same from the local folder."""
from __future__ import annotations

import pytest
import torch

from blindseg_dist.data import location as loc
from blindseg_dist.data.evalset import EvalDataset
from blindseg_dist.data.location import RemoteOptions
from blindseg_dist.engine.evaluate import evaluate_dataset, resolve_protocol
from tests.data._shard_server import ShardServer
from tests.data._tiny_shards import write_tiny_shards


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote_val")
    manifest, _ = write_tiny_shards(d, n=5, per_shard=2, sizes=[(30, 40), (24, 52), (36, 20), (30, 40), (28, 28)],
                                    prefix="val")
    return d


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(loc, "BACKOFF", 0.01)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 19, 1))


def _items(ds):
    return [(it["key"], it["image"], it["label"]) for it in (ds[i] for i in range(len(ds)))]


def _same(a, b):
    assert [k for k, _, _ in a] == [k for k, _, _ in b]
    for (_, ia, la), (_, ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)


def test_eval_from_http_pipe_and_brace_equal_local(val_dir, tmp_path):
    local = EvalDataset(val_dir)
    ref_items = _items(local)
    ref_cm = evaluate_dataset(_net(), local)
    assert ref_cm.sum() > 0
    remote = RemoteOptions(retries=1, timeout=20, cache_dir=str(tmp_path / "cache"))
    with ShardServer(val_dir) as srv:
        http = EvalDataset(srv.url, remote=remote)
        assert srv.hits["val-000000.tar"] == 0  # the manifest lists the samples: nothing fetched yet
        _same(_items(http), ref_items)
        assert torch.equal(evaluate_dataset(_net(), http), ref_cm)
        assert all(srv.hits[f"val-{i:06d}.tar"] == 1 for i in range(3))  # fetched once, then from the cache
        assert resolve_protocol("t", srv.url) == "full"
    for spec in (f"pipe:cat {val_dir}/val-{{000000..000002}}.tar", f"{val_dir}/val-{{000000..000002}}.tar"):
        ds = EvalDataset(spec, remote=remote)
        _same(_items(ds), ref_items)
        assert torch.equal(evaluate_dataset(_net(), ds), ref_cm)


def test_eval_shard_that_keeps_failing_is_fatal(val_dir, tmp_path):
    remote = RemoteOptions(retries=1, timeout=20, cache_dir=str(tmp_path / "cache"))
    with ShardServer(val_dir) as srv:
        srv.drop["val-000001.tar"] = -1
        ds = EvalDataset(srv.url + "/", remote=remote)
        ds[0]  # shard 0 is fine
        with pytest.raises(RuntimeError, match="val-000001.tar cannot be read.*never skips"):
            ds[2]
        assert srv.hits["val-000001.tar"] == 2



def test_blindseg_eval_two_processes_from_http_equals_local(tmp_path):
    """`blindseg eval --data night=http://...` on 2 gloo processes: the confusion matrix of the local
    folder; each rank fetches only the shards of its slice, into the shared cache."""
    import json
    import os
    import subprocess

    import numpy as np

    from blindseg_dist.launcher import blindseg_command, launch_env
    from tests.engine._eval_fixtures import make_checkpoint, make_shards

    shards = make_shards(tmp_path, images=5)
    ckpt = make_checkpoint(tmp_path / "run")
    env = launch_env(cpu=True, base=dict(os.environ, OMP_NUM_THREADS="1", BLINDSEG_CACHE=str(tmp_path / "cache")))

    def run(processes, target, out):
        cmd = blindseg_command(["eval", "--checkpoint", str(ckpt), "--json", str(out), "--data", f"night={target}"],
                               processes=processes)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(out.read_text())

    with ShardServer(shards["night"]) as srv:
        remote = run(2, srv.url, tmp_path / "remote.json")
        tars = [s["name"] for s in json.loads((shards["night"] / "manifest.json").read_text())["shards"]]
        # each shard fetched by the ranks that read it (the one shared by both slices at most twice)
        assert all(1 <= srv.hits[t] <= 2 for t in tars) and sum(srv.hits[t] for t in tars) <= len(tars) + 1
    assert remote["world_size"] == 2
    # the same checkpoint evaluated here, in one process, on the local folder
    from blindseg_dist.engine.evaluate import build_eval_dataset, target_result
    from blindseg_dist.tools.evaluate_cli import load_checkpoint_model

    _, net = load_checkpoint_model(ckpt)
    local = target_result(evaluate_dataset(net, build_eval_dataset(shards["night"], "full")))
    assert remote["targets"]["night"]["protocol"] == "full"
    assert np.array_equal(np.array(remote["targets"]["night"]["confusion_matrix"]), np.array(local["confusion_matrix"]))
    assert remote["targets"]["night"]["miou"] == local["miou"] and np.array(local["confusion_matrix"]).sum() > 0
    assert len(list((tmp_path / "cache").iterdir())) == len(tars)


def test_cli_errors_name_the_location_and_the_missing_package(tmp_path, capsys, monkeypatch):
    from blindseg_dist.cli import main
    from tests.engine._eval_fixtures import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "run")
    with ShardServer(tmp_path) as srv:
        rc = main(["eval", "--checkpoint", str(ckpt), "--json", str(tmp_path / "e.json"), "--data",
                   f"x={srv.url}/nothing_here"])
    assert rc == 2 and "nothing_here/manifest.json" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "s3fs", None)
    rc = main(["eval", "--checkpoint", str(ckpt), "--json", str(tmp_path / "e.json"), "--data", "x=s3://bucket/val"])
    assert rc == 2 and "s3fs" in capsys.readouterr().err and not (tmp_path / "e.json").exists()
