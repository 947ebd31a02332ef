"""The class-uniform epoch (released datasets/uniform.py build_epoch) built from the shard manifest:
exact per-class counts, pairs from the whole data set, whole tiles only, the partition over ranks and
loader workers, and resuming (docs/DATA.md, "Class-uniform sampling")."""
import collections
import itertools
import json
import warnings

import numpy as np
import pytest

from blindseg_dist.data.labels import NUM_CLASSES
from blindseg_dist.data.sampler import (SampleTable, build_epoch, stream_order, stream_slice,
                                        whole_tile_centroids)
from blindseg_dist.data.stream import ShardStream, load_sample_table, make_train_loader
from blindseg_dist.data.views import TwoViewTransform
from tests.data._tiny_shards import write_tiny_shards

ABSENT = (16, 17)  # classes without any centroid in the test table
RARE = 18  # a class with 3 pairs only (fewer than k: wraps around)


def _table(n=400, per_shard=25, seed=0):
    """A manifest-like table of GTA5-sized (1052 x 1914) frames: one whole tile (top left) each;
    every frame also lists a centroid in the partial right strip, which must never be drawn."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        cents = {}
        for c in range(NUM_CLASSES):
            if c in ABSENT or (c == RARE and i % 150 != 7) or (c != RARE and rng.random() < 0.3):
                continue
            cents[str(c)] = [[int(rng.integers(1024)), int(rng.integers(1024))]]
        cents.setdefault("0", []).append([500, 1500])  # x >= 1024: the partial tile
        samples.append({"key": f"f{i:05d}", "shard": i // per_shard, "size": [1052, 1914], "centroids": cents})
    shards = [f"s{j:03d}.tar" for j in range((n + per_shard - 1) // per_shard)]
    return SampleTable.from_samples(shards, samples), samples


def test_epoch_has_the_released_counts_and_draws_pairs_from_the_whole_set():
    table, samples = _table()
    n, pct = table.num_samples, 0.5
    k = int(n * pct / NUM_CLASSES)
    assert k == 10
    present = [c for c in range(NUM_CLASSES) if c not in ABSENT]
    assert [c for c in range(NUM_CLASSES) if len(table.pairs[c])] == present
    assert len(table.pairs[RARE]) == 3
    assert not any((p[:, 2] >= 1024).any() for p in table.pairs if len(p))  # partial tile never listed
    drawn = collections.defaultdict(set)
    for epoch in range(50):
        items = build_epoch(table, pct, seed=7, epoch=epoch)
        counts = collections.Counter(items["cls"].tolist())
        assert counts[-1] == n - NUM_CLASSES * k  # N - 19 k uniform draws ...
        assert all(counts[c] == k for c in present) and not any(counts[c] for c in ABSENT)  # ... k per class
        assert len(items) == table.epoch_size(pct) == n - NUM_CLASSES * k + k * len(present)
        uni = items[items["cls"] == -1]
        assert len(set(uni["sample"].tolist())) == len(uni) and (uni["cy"] == -1).all()  # no replacement
        pairs = {c: {tuple(r) for r in table.pairs[c].tolist()} for c in present}
        for it in items[items["cls"] >= 0]:
            c, pair = int(it["cls"]), (int(it["sample"]), int(it["cy"]), int(it["cx"]))
            assert pair in pairs[c]  # a real (image, centroid) pair of that class
            drawn[c].add(pair)
        rare = collections.Counter(map(tuple, np.stack([items["sample"], items["cy"]], 1)[items["cls"] == RARE].tolist()))
        assert sorted(rare.values()) == [3, 3, 4]  # 10 draws from 3 pairs: a shuffled list, wrapped around
        assert len(set(items["seed"].tolist())) == len(items)
    for c in present:  # over 50 epochs the draws cover the whole data set, every shard
        assert len(drawn[c]) >= 0.7 * len(pairs[c]) or drawn[c] == pairs[c], c
        assert {s // 25 for s, _, _ in drawn[c]} == {s // 25 for s, _, _ in pairs[c]}, c
    a, b = build_epoch(table, pct, 7, 3), build_epoch(table, pct, 7, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, build_epoch(table, pct, 7, 4))
    plain = build_epoch(table, 0.0, 7, 0)  # pct 0: a permutation of the data set
    assert (plain["cls"] == -1).all() and sorted(plain["sample"].tolist()) == list(range(n))


def test_whole_tile_rule_and_old_manifests():
    # blindseg-shards/1 stored centroids of partial tiles too; a tile's centroid lies in its tile
    cents = {"3": [[10, 10], [10, 1500], [1040, 20]], "5": [[1100, 1100]], "7": [[2047, 1023]]}
    assert whole_tile_centroids(cents, [1052, 1914]) == {3: [(10, 10)]}
    assert whole_tile_centroids(cents, [2048, 2048]) == {3: [(10, 10), (10, 1500), (1040, 20)],
                                                          5: [(1100, 1100)], 7: [(2047, 1023)]}
    assert whole_tile_centroids(cents, [1000, 5000]) == {}


def test_partition_one_vs_three_ranks_two_workers():
    table, _ = _table(n=416, per_shard=16)
    pct, B = 0.5, 2
    kw = dict(batch_size=B, class_uniform=pct, seed=3)
    m = table.epoch_size(pct)
    assert m % 12 == 0  # divisible by 6 streams x batch 2: nothing dropped, the unions are equal
    one = ShardStream(table, TwoViewTransform(crop_size=8), world_size=1, num_workers=0, **kw)
    six = [ShardStream(table, TwoViewTransform(crop_size=8), world_size=3, rank=r, num_workers=2, **kw)
           for r in range(3)]
    assert one.epoch_batches == m // B and six[0].epoch_batches == m // (6 * B)
    as_set = lambda a: collections.Counter(map(tuple, a.tolist()))  # noqa: E731
    for e in range(2):
        epoch = as_set(build_epoch(table, pct, 3, e))
        assert as_set(one.epoch_items(e, 0)) == epoch
        parts = [six[g // 2].epoch_items(e, g) for g in range(6)]
        assert all(len(p) == m // 6 for p in parts)
        union = sum((as_set(p) for p in parts), collections.Counter())
        assert union == epoch  # the same epoch, split without overlap (seeds make items unique)
        # each stream reads a few whole shards: at most the neighbours share a shard
        shards = [set(table.shard[p["sample"]].tolist()) for p in parts]
        assert sum(len(s) for s in shards) <= len(table.shards) + 5
        # batches mix open shards: not all of a batch from one shard
        mixed = [len(set(table.shard[p["sample"][i:i + B]].tolist())) > 1 for p in parts for i in range(0, len(p), B)]
        assert np.mean(mixed) > 0.5
    # a remainder is dropped like drop_last, never duplicated
    seven = ShardStream(table, TwoViewTransform(crop_size=8), world_size=7, num_workers=0, **kw)
    parts = [stream_slice(table, pct, 3, 0, 1, 7, seven.epoch_batches * B, g) for g in range(7)]
    union = sum((as_set(p) for p in parts), collections.Counter())
    assert not (union - as_set(build_epoch(table, pct, 3, 0))) and m - sum(union.values()) < 7 * B


def test_stream_order_reads_every_shard_front_to_back():
    table, _ = _table(n=200, per_shard=10)
    items = stream_slice(table, 0.5, 1, 0, 1, 1, 180, 0)
    out = stream_order(items, table, 1, 0, 0, open_shards=3, buffer=6)
    assert collections.Counter(map(tuple, out.tolist())) == collections.Counter(map(tuple, items.tolist()))
    assert not np.array_equal(out, items)
    # an item is emitted at most buffer + open_shards reads after the shard reader passed it
    pos = {tuple(r): i for i, r in enumerate(items.tolist())}
    lag = [pos[tuple(r)] - i for i, r in enumerate(out.tolist())]
    assert max(abs(x) for x in lag) < 60


@pytest.fixture(scope="module")
def cu_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("cu")
    write_tiny_shards(d, n=40, per_shard=4, hw=(32, 44), tile=16)  # 2 x 2 whole 16-px tiles per frame
    return d


def _info(batches):
    return [(i["key"], i["class"], tuple(i["centroid"] or ()), tuple(i["crop"]), i["scale"])
            for b in batches for i in b["info"]]


KW = dict(batch_size=2, crop_size=12, class_uniform=1.0, seed=5, info=True)


def test_loader_one_vs_three_ranks_two_workers_same_epoch(cu_shards):
    table = load_sample_table(cu_shards)
    m = table.epoch_size(1.0)
    assert (table.per_class(1.0), m) == (2, 12)  # 40 - 38 uniform + 2 x 5 classes
    one = list(itertools.islice(iter(make_train_loader(cu_shards, num_workers=0, **KW)), 6))
    ref = _info(one)
    assert collections.Counter(c for _, c, *_ in ref) == {None: 2, 0: 2, 2: 2, 8: 2, 10: 2, 13: 2}
    for key, cls, cen, crop, _ in ref:
        if cls is not None:
            x1, y1, x2, y2 = crop
            assert x1 - 0.01 <= cen[0] < x2 + 0.01 and y1 - 0.01 <= cen[1] < y2 + 0.01  # holds the centroid
            assert 0 <= x1 < x2 <= 44 and 0 <= y1 < y2 <= 32
    got = []
    for r in range(3):
        got += _info(itertools.islice(iter(make_train_loader(cu_shards, num_workers=2, rank=r, world_size=3, **KW)), 2))
    assert len(got) == len(set(got)) == 12 and collections.Counter(got) == collections.Counter(ref)


def test_resume_gives_the_same_remaining_items(cu_shards):
    kw = {**KW, "class_uniform": 0.5, "batch_size": 3}
    full = list(itertools.islice(iter(make_train_loader(cu_shards, num_workers=2, **kw)), 9))
    for s in (1, 4, 7):
        rest = list(itertools.islice(iter(make_train_loader(cu_shards, num_workers=2, start_step=s, **kw)), 9 - s))
        assert _info(rest) == _info(full[s:])
        for a, b in zip(rest, full[s:]):
            assert a["keys"] == b["keys"] and all((a[t] == b[t]).all() for t in ("image", "image_aug", "label"))


def test_manifest_without_sample_list_or_old_format(cu_shards, tmp_path):
    ref = load_sample_table(cu_shards)
    with pytest.warns(UserWarning, match="reading all 10 shards"):
        scanned = load_sample_table(sorted(str(p) for p in cu_shards.glob("*.tar")))
    assert scanned.keys == ref.keys and np.array_equal(scanned.shard, ref.shard)
    assert sum(len(p) for p in scanned.pairs) == 0  # tar meta has no tile: the released 1024 (none here)
    # an old (/1) manifest with partial-tile centroids is read, keeping only the whole tiles
    m = json.loads((cu_shards / "manifest.json").read_text())
    m["format"] = "blindseg-shards/1"
    m.pop("centroid_tile")
    for s in m["samples"]:
        s["centroids"] = {"3": [[5, 5], [5, 1500]]}  # the second lies in the partial right strip
        s["size"] = [1052, 1914]
    old = tmp_path / "old"
    old.mkdir()
    for p in cu_shards.glob("*.tar"):
        (old / p.name).symlink_to(p)
    (old / "manifest.json").write_text(json.dumps(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = load_sample_table(old)
    assert [len(p) for p in t.pairs][3] == 40 and sum(len(p) for p in t.pairs) == 40


def test_all_reads_go_through_open_shard_sequentially(cu_shards, monkeypatch):
    """The stream opens tars only through stream.open_shard and never seeks: a location that can
    only be read front to back (a pipe, an HTTP body) works, each shard opened once per epoch."""
    import io
    import tarfile

    from blindseg_dist.data import stream as S

    class Pipe(io.RawIOBase):  # readable, not seekable
        def __init__(self, data):
            self.data, self.at = data, 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), len(self.data) - self.at)
            b[:n] = self.data[self.at:self.at + n]
            self.at += n
            return n

    opened = []

    def open_pipe(location):
        opened.append(location)
        with open(location, "rb") as f:
            raw = io.BufferedReader(Pipe(f.read()))
        with tarfile.open(fileobj=raw, mode="r|") as tf:
            for ti in tf:
                if ti.isfile():
                    yield ti.name, tf.extractfile(ti).read()

    ref = list(itertools.islice(iter(make_train_loader(cu_shards, num_workers=0, **KW)), 6))
    monkeypatch.setattr(S, "open_shard", open_pipe)
    got = list(itertools.islice(iter(make_train_loader(cu_shards, num_workers=0, **KW)), 6))  # one epoch
    assert _info(got) == _info(ref)
    assert len(opened) == len(set(opened)) <= 10
