"""Shard locations (data/location.py): folders, brace patterns, http(s) from a local server, pipe:,
fsspec; bounded retries and deadlines; the verified cache."""
from __future__ import annotations

import hashlib
import json
import sys
import time

import pytest

from blindseg_dist.data import location as loc
from blindseg_dist.data.location import MissingBackendError, ShardCache, ShardReadError, iter_shard, resolve
from tests.data._shard_server import ShardServer
from tests.data._tiny_shards import write_tiny_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loc_shards")
    write_tiny_shards(d, n=6, per_shard=2, hw=(16, 24))
    return d


def _read(url, **kw):
    return [(k, sorted(f.items())) for k, f in iter_shard(url, **kw)]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(loc, "BACKOFF", 0.01)


def test_local_folder_and_brace_pattern(shard_dir):
    folder = resolve(shard_dir)
    assert [p.rsplit("/", 1)[-1] for p in folder.urls] == [f"train-{i:06d}.tar" for i in range(3)]
    assert set(folder.counts.values()) == {2} and folder.manifest["num_samples"] == 6 and not folder.remote
    brace = resolve(f"{shard_dir}/train-{{000000..000002}}.tar")
    assert brace.urls == folder.urls and brace.counts == folder.counts  # manifest found next to the tars
    two = resolve(f"{shard_dir}/train-{{000001..000002}}.tar")
    assert len(two.urls) == 2 and two.urls == folder.urls[1:]
    with pytest.raises(FileNotFoundError, match="listed but missing"):
        resolve(f"{shard_dir}/train-{{000000..000005}}.tar")
    samples = _read(folder.urls[0], expected=2)
    assert [k for k, _ in samples] == ["img_00000", "img_00001"]
    assert {e for e, _ in samples[0][1]} == {"image.png", "label.png", "meta.json"}


def test_http_folder_equals_local(shard_dir):
    local = resolve(shard_dir)
    with ShardServer(shard_dir) as srv:
        remote = resolve(srv.url + "/")
        assert remote.remote and remote.urls == [f"{srv.url}/{u.rsplit('/', 1)[-1]}" for u in local.urls]
        assert remote.manifest == local.manifest and list(remote.counts.values()) == list(local.counts.values())
        for lu, ru in zip(local.urls, remote.urls):
            assert _read(ru, expected=2) == _read(lu)
        brace = resolve(srv.url + "/train-{000000..000002}.tar")
        assert brace.urls == remote.urls and brace.counts == remote.counts
        assert srv.hits["manifest.json"] == 2


def test_pipe_url_and_manifest_next_to_it(shard_dir):
    local = resolve(shard_dir)
    spec = f"pipe:cat {shard_dir}/train-000001.tar"
    assert loc.manifest_location(spec) == f"pipe:cat {shard_dir}/manifest.json"
    s = resolve(spec)
    assert s.urls == [spec] and s.counts == {spec: 2} and s.manifest == local.manifest
    assert _read(spec, expected=2) == _read(local.urls[1])
    pattern = resolve(f"pipe:cat {shard_dir}/train-{{000000..000002}}.tar")
    assert len(pattern.urls) == 3 and all(u.startswith("pipe:cat ") for u in pattern.urls)
    with pytest.raises(ShardReadError, match="after 2 attempts"):  # the command fails: retried, then an error
        list(iter_shard(f"pipe:cat {shard_dir}/nope.tar", retries=1, timeout=10))


def test_drop_mid_shard_is_retried_and_resumes_identically(shard_dir):
    local = resolve(shard_dir)
    with ShardServer(shard_dir) as srv:
        srv.drop["train-000000.tar"] = 2  # two dropped connections, then a good one
        got = _read(f"{srv.url}/train-000000.tar", expected=2, retries=3, timeout=20)
        assert got == _read(local.urls[0]) and srv.hits["train-000000.tar"] == 3


def test_drop_every_time_fails_after_bounded_retries(shard_dir):
    with ShardServer(shard_dir) as srv:
        srv.drop["train-000001.tar"] = -1
        t0 = time.time()
        with pytest.raises(ShardReadError) as ei:
            _read(f"{srv.url}/train-000001.tar", expected=2, retries=2, timeout=20)
        assert srv.hits["train-000001.tar"] == 3 and time.time() - t0 < 15
        assert "after 3 attempts" in str(ei.value) and not ei.value.missing
        assert 0 <= ei.value.samples <= 1  # the half that came through, never more


def test_missing_shard_is_not_retried(shard_dir):
    with ShardServer(shard_dir) as srv:
        with pytest.raises(ShardReadError, match="not found") as ei:
            _read(f"{srv.url}/train-000009.tar", retries=3, timeout=20)
        assert ei.value.missing and srv.hits["train-000009.tar"] == 1
        with pytest.raises(ShardReadError, match="manifest"):  # a folder URL without a manifest
            resolve(srv.url + "/no_such_folder")


def test_stalled_server_hits_the_deadline(shard_dir):
    with ShardServer(shard_dir) as srv:
        srv.stall["train-000002.tar"] = 30
        t0 = time.time()
        with pytest.raises(ShardReadError, match="timed out|28|Timeout"):
            _read(f"{srv.url}/train-000002.tar", expected=2, retries=1, timeout=1.5)
        assert time.time() - t0 < 12 and srv.hits["train-000002.tar"] == 2


def test_slow_consumer_is_not_a_timeout(tmp_path):
    """The deadline counts the time blocked waiting for bytes, not the time the reader takes: a 32 MB
    shard (far more than the pipe and socket buffers) read over 4 s with a 1 s deadline is fine."""
    _big_tar(tmp_path / "big.tar", 8, 4 << 20)
    with ShardServer(tmp_path) as srv:
        got = []
        for key, _ in iter_shard(f"{srv.url}/big.tar", expected=8, retries=0, timeout=1.0):
            time.sleep(0.5)
            got.append(key)
        assert got == [f"s{i}" for i in range(8)] and srv.hits["big.tar"] == 1


def test_fsspec_location_and_missing_backend(shard_dir, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in sorted(shard_dir.iterdir()):
        fs.pipe(f"/blindseg_test/{p.name}", p.read_bytes())
    local = resolve(shard_dir)
    mem = resolve("memory://blindseg_test")
    assert mem.remote and len(mem.urls) == 3 and mem.counts == {u: 2 for u in mem.urls}
    assert _read(mem.urls[2], expected=2) == _read(local.urls[2])
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as on a machine without s3fs
    with pytest.raises(MissingBackendError, match="s3fs"):
        resolve("s3://bucket/shards")
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(MissingBackendError, match="pip install fsspec gcsfs"):
        resolve("gs://bucket/shards")


def test_cache_verifies_and_stays_bounded(shard_dir, tmp_path):
    local = resolve(shard_dir)
    m = json.loads((shard_dir / "manifest.json").read_text())
    with ShardServer(shard_dir) as srv:
        cache = ShardCache(tmp_path / "cache", max_bytes=2 * max(s["bytes"] for s in m["shards"]))
        paths = []
        for s, lu in zip(m["shards"], local.urls):
            sha = hashlib.sha256(open(lu, "rb").read()).hexdigest()
            p = cache.fetch(f"{srv.url}/{s['name']}", sha256=sha, size=s["bytes"])
            assert open(p, "rb").read() == open(lu, "rb").read()
            paths.append(p)
        assert len(list((tmp_path / "cache").iterdir())) == 2  # the oldest was evicted
        hits = srv.hits["train-000002.tar"]
        assert cache.fetch(f"{srv.url}/train-000002.tar", size=m["shards"][2]["bytes"]) == paths[2]
        assert srv.hits["train-000002.tar"] == hits  # served from the cache
        with pytest.raises(ShardReadError, match="sha256"):
            cache.fetch(f"{srv.url}/train-000000.tar", sha256="0" * 64, retries=1)
        assert srv.hits["train-000000.tar"] == 3


def _big_tar(path, n, size):
    import io
    import os
    import tarfile

    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (("image.png", os.urandom(size)), ("label.png", b"x"), ("meta.json", b"{}")):
                ti = tarfile.TarInfo(f"s{i}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_abandoned_stream_closes_at_once(tmp_path):
    """Stopping early (the loader moves on) kills the transfer instead of waiting for it."""
    _big_tar(tmp_path / "big.tar", 8, 256 << 10)
    with ShardServer(tmp_path) as srv:
        srv.stall["big.tar"] = 30
        t0 = time.time()
        it = iter_shard(f"{srv.url}/big.tar", retries=0, timeout=60)
        assert next(it)[0] == "s0"  # from the first half; the server now stalls
        it.close()
        assert time.time() - t0 < 5
