"""Two "nodes" on one machine: two `accelerate launch` invocations (--num_machines 2, --machine_rank 0/1,
2 processes each, 4 ranks) form one gloo group, end with identical weights on all 4 ranks, and each
node streams its own data."""
import json
import subprocess

from blindseg_dist.launcher import free_port
from tests.engine._engine_runs import ROOT, env, summary, train_cmd


def test_two_nodes_train_one_model_on_different_data(train_shards, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [
        subprocess.Popen(
            train_cmd(out, train_shards, 2, "run.record_stream=true", processes=4, machines=2, machine_rank=r, port=port),
            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, o in zip(nodes, outputs):
        assert p.returncode == 0, o[-3000:]
    s = summary(out)
    assert s["world_size"] == 4 and s["steps"] == 2
    records = [json.loads((out / f"streamed-rank{r}.json").read_text()) for r in range(4)]
    assert {r["params_sha256"] for r in records} == {records[0]["params_sha256"]}  # one model on 4 ranks
    assert all(len(r["keys"]) == 2 for r in records)  # 2 steps x 1 micro-batch each
    assert all(r["shards"] and "?" not in r["shards"] for r in records)  # keys map to shards of the manifest
    node0 = [k for r in records[:2] for b in r["keys"] for k in b]
    node1 = [k for r in records[2:] for b in r["keys"] for k in b]
    assert node0 != node1  # each node streamed its own samples (not one stream split or copied)
    assert records[0]["keys"] != records[1]["keys"] and records[2]["keys"] != records[3]["keys"]
