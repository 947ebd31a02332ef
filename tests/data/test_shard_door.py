"""One door to shards (data/location.py): the stream's sequential reader, the remote reader and the
evaluation index see the same samples of a shard, and a tar cut inside a member is an error to all."""
from __future__ import annotations

import pytest

from blindseg_dist.data import location as loc
from blindseg_dist.data import stream
from blindseg_dist.data.evalset import EvalDataset
from tests.data._tiny_shards import write_tiny_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("door")
    write_tiny_shards(d, n=6, per_shard=3, hw=(16, 24))
    return d


def test_every_reader_sees_the_same_samples(shard_dir):
    found = loc.resolve(shard_dir)
    assert len(found.urls) == 2 and set(found.counts.values()) == {3}
    for url in found.urls:
        seq = [(k, sorted(m)) for k, m in loc.group_samples(loc.open_shard(url))]
        indexed, error = loc.index_shard(url, found.counts[url])
        assert error is None and [(k, sorted(m)) for k, m in indexed] == seq
        assert [(k, sorted(m)) for k, m in loc.iter_shard(url, expected=3)] == seq
        assert [(k, sorted(m)) for k, m in stream.iter_samples(url)] == seq
        assert [(k, sorted(m)) for k, m in loc.group_samples(loc.open_shard(url), skip=2)] == seq[2:]
        pipe = [(k, sorted(m)) for k, m in loc.iter_shard(f"pipe:cat {url}", retries=0, timeout=30)]
        assert pipe == seq  # a stream that cannot seek reads like the file
    ds = EvalDataset(shard_dir)
    assert [ds.key(i) for i in range(len(ds))] == [k for u in found.urls for k, _ in loc.index_shard(u)[0]]


def test_a_tar_cut_inside_a_member_fails_every_reader(shard_dir, tmp_path):
    import tarfile

    url = loc.resolve(shard_dir).urls[0]
    with tarfile.open(url) as tf:
        member = tf.getmembers()[3]  # the second sample's image
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(url, "rb").read()[:member.offset_data + member.size // 2])
    with pytest.raises((tarfile.TarError, OSError, EOFError)):
        list(loc.group_samples(loc.open_shard(str(cut))))
    with pytest.raises(loc.ShardReadError, match="after 1 attempt"):
        list(loc.iter_shard(str(cut)))
    samples, error = loc.index_shard(str(cut))
    assert error is not None and len(samples) < 3
