"""Training streams from remote locations (http from a local server, pipe:, brace patterns) equal the
local folder; a shard that keeps failing is counted and skipped (warn) or fatal (fail)."""
from __future__ import annotations

import pytest
import torch

from blindseg_dist.data import location as loc
from blindseg_dist.data.location import RemoteOptions
from tests.data._shard_server import ShardServer
from tests.data._tiny_shards import write_tiny_shards


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(loc, "BACKOFF", 0.01)


KW = dict(batch_size=2, crop_size=16, num_workers=0, seed=5, epoch_batches=3)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for k in ("image", "image_aug", "label"):
            assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote_train")
    write_tiny_shards(d, n=8, per_shard=2, hw=(24, 32))
    return d


def test_train_stream_from_http_pipe_and_brace_equals_local(train_dir):
    from blindseg_dist.data.stream import make_train_loader

    ref = _take(make_train_loader(train_dir, **KW), 6)
    with ShardServer(train_dir) as srv:
        _same_batches(_take(make_train_loader(srv.url, **KW), 6), ref)
        srv.drop["train-000001.tar"] = 1  # a transient drop: retried, resumed, same batches
        _same_batches(_take(make_train_loader(srv.url + "/", remote=RemoteOptions(retries=2, timeout=20), **KW), 6),
                      ref)
        assert srv.hits["train-000001.tar"] >= 2
    _same_batches(_take(make_train_loader(f"pipe:cat {train_dir}/train-{{000000..000003}}.tar", **KW), 6), ref)
    _same_batches(_take(make_train_loader(f"{train_dir}/train-{{000000..000003}}.tar", **KW), 6), ref)


def test_train_shard_failing_after_retries_is_counted_or_fatal(train_dir):
    from blindseg_dist.data.stream import CorruptShardError, CorruptShardWarning, make_train_loader

    remote = RemoteOptions(retries=1, timeout=20)
    with ShardServer(train_dir) as srv:
        srv.drop["train-000002.tar"] = -1
        with pytest.warns(CorruptShardWarning, match="train-000002.tar"):
            batches = _take(make_train_loader(srv.url, remote=remote, **KW), 9)
        assert int(batches[-1]["corrupt_shards"]) == 1
        # only what arrived complete before the drop can be used (the first half holds at most img_00004)
        assert "img_00005" not in {k for b in batches for k in b["keys"]}
        hits = srv.hits["train-000002.tar"]
        assert hits >= 2 and hits % 2 == 0  # every open: 1 try + 1 retry
        with pytest.raises(CorruptShardError, match="train-000002.tar"):
            _take(make_train_loader(srv.url, remote=remote, on_corrupt="fail", **KW), 9)


def test_blindseg_train_and_eval_from_http_equal_local(tmp_path):
    """`blindseg train` on 2 gloo processes with data.train and eval.targets at http://127.0.0.1:PORT:
    the same sample keys per rank, the same weights and the same confusion matrix as the local folder."""
    import json

    from tests.engine._engine_runs import env, run, tail, train_cmd
    from tests.engine._eval_fixtures import make_shards

    shards = make_shards(tmp_path, images=4)

    def train(out, source, target):
        res = run(train_cmd(out, source, 1, "run.record_stream=true", "eval.at_end=true", "eval.max_images=3",
                            f"eval.targets={{night: '{target}'}}", processes=2),
                  env(BLINDSEG_CACHE=str(tmp_path / "cache")), timeout=300)
        assert res.returncode == 0, tail(res)
        ranks = [json.loads((out / f"streamed-rank{r}.json").read_text()) for r in range(2)]
        return ranks, json.loads((out / "eval.json").read_text())

    local_ranks, local_eval = train(tmp_path / "local", shards["train"], shards["night"])
    with ShardServer(shards["train"].parent) as srv:
        http_ranks, http_eval = train(tmp_path / "http", f"{srv.url}/train", f"{srv.url}/night")
        assert srv.hits["train/manifest.json"] >= 1 and any(srv.hits[k] for k in srv.hits if k.startswith("night/"))
    for a, b in zip(local_ranks, http_ranks):
        assert a["keys"] == b["keys"] and a["params_sha256"] == b["params_sha256"] and a["shards"] == b["shards"]
    assert local_ranks[0]["keys"] != local_ranks[1]["keys"]  # two ranks, two streams
    cm = [e["targets"]["night"]["confusion_matrix"] if "targets" in e else e["night"]["confusion_matrix"]
          for e in (local_eval, http_eval)]
    assert cm[0] == cm[1] and sum(map(sum, cm[0])) > 0


def test_train_stream_from_http_with_loader_workers(train_dir):
    """Two DataLoader worker processes stream their own shards over http: the local batches."""
    from blindseg_dist.data.stream import make_train_loader

    kw = {**KW, "num_workers": 2}
    ref = _take(make_train_loader(train_dir, **kw), 4)
    with ShardServer(train_dir) as srv:
        got = _take(make_train_loader(srv.url, remote=RemoteOptions(retries=1, timeout=30), **kw), 4)
    _same_batches(got, ref)
