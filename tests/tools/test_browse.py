"""`blindseg browse`: a PNG grid and samples.jsonl of what the training loader feeds, through the
trainer's own loader call (data.stream.train_loader_from_config)."""
import itertools
import json
from pathlib import Path

import cv2
import numpy as np

from blindseg_dist.cli import main
from blindseg_dist.config import load_config
from blindseg_dist.data.stream import train_loader_from_config
from tests.data._tiny_shards import write_tiny_shards

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


def test_browse_writes_grid_and_jsonl_of_the_training_stream(tmp_path, capsys):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, n=40, per_shard=4, hw=(32, 44), tile=16)
    over = [f"data.train={shards}", "data.crop_size=24", "data.batch_size=2", "data.num_workers=0",
            "data.class_uniform=1.0", "data.scale_range=[0.8, 1.2]"]
    out = tmp_path / "browse"
    assert main(["browse", "--config", DEMO, "--num", "5", "--out", str(out), "--tile", "48", *over]) == 0
    assert "5 samples" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and all(set(r) == {"key", "class", "centroid", "crop", "scale", "flip"} for r in recs)
    # exactly what training sees: the trainer's loader call gives the same samples, crops and scales
    cfg = load_config(DEMO, over)
    batches = list(itertools.islice(iter(train_loader_from_config(cfg, info=True)), 3))
    ref = [i for b in batches for i in b["info"]][:5]
    assert [(r["key"], r["class"], r["centroid"], r["crop"], r["scale"]) for r in recs] == \
        [(i["key"], i["class"], i["centroid"], i["crop"], i["scale"]) for i in ref]
    assert [r["key"] for r in recs] == [k for b in batches for k in b["keys"]][:5]
    grid = cv2.imread(str(out / "grid.png"), cv2.IMREAD_COLOR)[..., ::-1]
    assert grid.shape == (5 * 48, 3 * 48, 3)
    n_class = 0
    for row, r in enumerate(recs):
        x1, y1, x2, y2 = r["crop"]
        assert 0 <= x1 < x2 <= 44 and 0 <= y1 < y2 <= 32 and 0.8 <= r["scale"] <= 1.2
        if r["class"] is not None:  # class-uniform: the crop holds the centroid, marked in the grid
            n_class += 1
            cx, cy = r["centroid"]
            assert x1 - 0.01 <= cx < x2 + 0.01 and y1 - 0.01 <= cy < y2 + 0.01
            label_tile = grid[row * 48:(row + 1) * 48, 96:144]
            assert (label_tile == (255, 0, 255)).all(-1).any()  # the magenta cross
    assert n_class >= 3  # class_uniform 1.0 on 40 frames: 10 of the 12 epoch items are class draws
    # bad input: a clear error, exit 2
    assert main(["browse", "--config", DEMO, "--num", "0", "--out", str(tmp_path / "x"), *over]) == 2
    assert main(["browse", "--config", DEMO, "--out", str(tmp_path / "y"), "data.crop_size=-3"]) == 2
