import itertools
import warnings

import pytest
import torch

from blindseg_dist.data.stream import CorruptShardError, CorruptShardWarning, index_shard, make_train_loader
from blindseg_dist.launcher import run_gloo
from tests.data._tiny_shards import write_tiny_shards

KW = dict(batch_size=2, crop_size=24, epoch_batches=2, shuffle_buffer=4)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_tiny_shards(d, n=12, per_shard=4, hw=(32, 44))
    return d


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("image", "image_aug", "label")) and a["keys"] == b["keys"]


def test_batches_shapes_and_deterministic(shard_dir):
    a = take(make_train_loader(shard_dir, num_workers=0, seed=3, **KW), 3)
    b = take(make_train_loader(shard_dir, num_workers=0, seed=3, **KW), 3)
    c = take(make_train_loader(shard_dir, num_workers=0, seed=4, **KW), 3)
    x = a[0]
    assert x["image"].shape == x["image_aug"].shape == (2, 3, 24, 24) and x["image"].dtype == torch.float32
    assert x["label"].shape == (2, 24, 24) and x["label"].dtype == torch.int64
    assert int(x["corrupt_shards"]) == 0
    assert all(same(p, q) for p, q in zip(a, b))
    assert not any(same(p, q) for p, q in zip(a, c))


def test_rank_and_worker_streams_differ(shard_dir):
    r0 = take(make_train_loader(shard_dir, num_workers=0, rank=0, world_size=2, **KW), 2)
    r1 = take(make_train_loader(shard_dir, num_workers=0, rank=1, world_size=2, **KW), 2)
    assert not any(same(p, q) for p, q in zip(r0, r1))
    w = take(make_train_loader(shard_dir, num_workers=2, **KW), 2)  # batch 0: worker 0, batch 1: worker 1
    assert not torch.equal(w[0]["image"], w[1]["image"])


def test_infinite(shard_dir):
    # 12 samples, batch 2: 40 batches = more than 6 passes over the data
    batches = take(make_train_loader(shard_dir, num_workers=0, batch_size=2, crop_size=8, epoch_batches=3), 40)
    assert len(batches) == 40


@pytest.mark.parametrize("workers,ks", [(0, (1, 5)), (2, (3, 4))])
def test_resume_is_bitwise_identical(shard_dir, workers, ks):
    n = 7  # crosses several epochs of 2 batches per worker
    full = take(make_train_loader(shard_dir, num_workers=workers, seed=11, **KW), n)
    for k in ks:
        resumed = take(make_train_loader(shard_dir, num_workers=workers, seed=11, start_step=k, **KW), n - k)
        for j, b in enumerate(resumed):
            assert same(b, full[k + j]), f"step {k + j} differs after resuming at {k} ({workers} workers)"


def test_truncated_shard_warns_counts_and_fail_mode_raises(tmp_path):
    write_tiny_shards(tmp_path, n=8, per_shard=4, hw=(32, 44))
    bad = tmp_path / "train-000001.tar"
    off, size = index_shard(str(bad))[0][2][1]["image.png"]
    with open(bad, "r+b") as f:
        f.truncate(off + size // 2)  # cut inside sample 2's image
    samples, err = index_shard(str(bad))
    assert err is not None and len(samples) == 2
    with pytest.warns(CorruptShardWarning, match="train-000001.tar"):
        batches = take(make_train_loader(tmp_path, num_workers=0, **KW), 6)
    assert int(batches[-1]["corrupt_shards"]) == 1
    with pytest.raises(CorruptShardError, match="train-000001.tar"):
        take(make_train_loader(tmp_path, num_workers=0, on_corrupt="fail", **KW), 6)


def test_truncated_at_member_boundary_detected(tmp_path):
    m, _ = write_tiny_shards(tmp_path, n=4, per_shard=4, hw=(32, 44))
    p = tmp_path / "train-000000.tar"
    samples, err = index_shard(str(p))
    assert err is None and len(samples) == 4
    off, size = samples[2][1]["meta.json"]  # cut right after sample 2's last member (a block boundary)
    with open(p, "r+b") as f:
        f.truncate(off + ((size + 511) // 512) * 512)
    samples, err = index_shard(str(p), expected=4)
    assert err is not None and len(samples) == 3


def test_all_shards_corrupt_raises_not_hangs(tmp_path):
    write_tiny_shards(tmp_path, n=4, per_shard=2, hw=(32, 44))
    for p in tmp_path.glob("*.tar"):
        p.write_bytes(b"\x07garbage" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptShardWarning)
        with pytest.raises(CorruptShardError, match="none of the 2 shards"):
            take(make_train_loader(tmp_path, num_workers=0, **KW), 1)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_train_loader(tmp_path / "nope", num_workers=0, **KW)


def _rank_main(rank, world, shard_dir, steps_by_rank):
    import torch.distributed as dist
    loader = make_train_loader(shard_dir, num_workers=2, rank=rank, world_size=world, **KW)
    count = 0
    for _, batch in zip(range(steps_by_rank), loader):
        count += 1
    t = torch.tensor([count, count * count], dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def test_equal_steps_two_gloo_processes(shard_dir):
    steps = 9  # more than the 12 samples / (2 ranks * 2 workers * batch 2) of one pass
    results = run_gloo(_rank_main, 2, str(shard_dir), steps, timeout=240)
    assert len(results) == 2
    for r in range(2):
        assert results[r] == [2 * steps, 2 * steps * steps]  # both ranks ran exactly `steps` steps
