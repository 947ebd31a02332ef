"""`blindseg eval` on 2 CPU processes (accelerate launch, gloo) gives exactly the 1-process confusion
matrices on a target of 5 images (not divisible by 2): every image counted once, none padded."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np

from blindseg_dist.launcher import blindseg_command, launch_env
from tests.engine._eval_fixtures import make_checkpoint, make_shards


def _eval(processes, ckpt, data, out, env):
    cmd = blindseg_command(["eval", "--checkpoint", str(ckpt), "--json", str(out),
                            "--data", *[f"{k}={v}" for k, v in data.items()]], processes=processes)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(Path(out).read_text())


def test_two_process_eval_equals_one_process(tmp_path):
    shards = make_shards(tmp_path, images=5)
    manifest = json.loads((shards["night"] / "manifest.json").read_text())
    assert manifest["num_samples"] == 5
    ckpt = make_checkpoint(tmp_path / "run")
    data = {"night": shards["night"], "synthia_like": shards["night"]}  # the name selects the synthia protocol
    env = launch_env(cpu=True, base=dict(os.environ, OMP_NUM_THREADS="1"))
    one = _eval(1, ckpt, data, tmp_path / "one.json", env)
    two = _eval(2, ckpt, data, tmp_path / "two.json", env)
    assert one["world_size"] == 1 and two["world_size"] == 2
    for name in data:
        cm1 = np.array(one["targets"][name]["confusion_matrix"], dtype=np.int64)
        cm2 = np.array(two["targets"][name]["confusion_matrix"], dtype=np.int64)
        assert np.array_equal(cm1, cm2), name
        assert one["targets"][name]["miou"] == two["targets"][name]["miou"]
        # each labelled pixel of the 5 images counted exactly once (rows = ground truth)
        gt = np.zeros(19, dtype=np.int64)
        for s in manifest["samples"]:
            for c, n in s["class_pixels"].items():
                gt[int(c)] += n
        assert np.array_equal(cm2.sum(1), gt)
    assert "miou16" in two["targets"]["synthia_like"] and "miou16" not in two["targets"]["night"]
    assert two["targets"]["synthia_like"]["miou16"] == one["targets"]["synthia_like"]["miou16"]
