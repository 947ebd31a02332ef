"""Batch diversity of the training stream on a GTA5-sized manifest, with and without the sharder's
shuffled sample order (computed from the sampler alone: no image is read).

    .venv/bin/python bench/batch_diversity.py

GTA5 frame ids are video-like: neighbouring ids show nearly the same scene. For 12,388 frames in
shards of 64, 2 ranks x 4 loader workers, batch 4, it prints the fraction of sample pairs inside a
batch that are the same frame or within 100 frame ids, and the mean number of shards per batch.
"""
from __future__ import annotations

import numpy as np

from blindseg_dist.data.sampler import SampleTable, stream_order, stream_slice


def main(n: int = 12388, spp: int = 64, streams: int = 8, batch: int = 4, seed: int = 304) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for shuffle in (False, True):
        ids = rng.permutation(n) if shuffle else np.arange(n)  # the frame id at each shard position
        samples = [{"key": f"{ids[i]:05d}", "shard": i // spp, "size": [1052, 1914],
                    "centroids": {str(c): [[10, 10]] for c in rng.choice(19, 8, replace=False)}} for i in range(n)]
        t = SampleTable.from_samples([f"s{j}" for j in range((n + spp - 1) // spp)], samples)
        fid = np.array([int(k) for k in t.keys])
        per = (t.epoch_size(0.5) // (streams * batch)) * batch
        same = near = pairs = 0
        shards = []
        for g in range(streams):
            it = stream_order(stream_slice(t, 0.5, seed, 0, 1, streams, per, g), t, seed, 0, g)
            for b in range(0, len(it), batch):
                f = fid[it["sample"][b:b + batch]]
                shards.append(len(set(t.shard[it["sample"][b:b + batch]].tolist())))
                d = np.abs(f[:, None] - f[None, :])[np.triu_indices(len(f), 1)]
                pairs, same, near = pairs + len(d), same + int((d == 0).sum()), near + int((d <= 100).sum())
        name = "shuffled" if shuffle else "key order"
        out[name] = {"same_frame": same / pairs, "within_100_ids": near / pairs, "shards_per_batch": float(np.mean(shards))}
        print(f"{name:10s} pairs: same frame {same / pairs:.3f}, within 100 ids {near / pairs:.3f}; "
              f"shards per batch {np.mean(shards):.2f}")
    return out


if __name__ == "__main__":
    main()
