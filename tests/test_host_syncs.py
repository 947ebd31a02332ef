"""bench/host_syncs.py: the counting rules on small cases, and the bench end to end at a tiny size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host_syncs import HostSyncCounter  # noqa: E402


def _counted(fn, *device_tensors):
    mode = HostSyncCounter()
    mode.mark(*device_tensors)
    with mode, mode.python_reads():
        fn()
    return mode.totals()


def test_counts_the_reads_of_device_tensors_only():
    x = torch.arange(10)
    host = torch.arange(10)
    assert _counted(lambda: x.nonzero(), x)["shape"] == 1
    assert _counted(lambda: torch.unique(x), x)["shape"] == 1
    assert _counted(lambda: x[x > 3], x)["shape"] == 1  # boolean-mask indexing
    assert _counted(lambda: x[torch.tensor([1, 2])], x)["shape"] == 0  # integer indexing: no wait
    assert _counted(lambda: int(x.sum()), x)["item"] == 1
    assert _counted(lambda: bool(x[0] > 0), x)["item"] == 1
    assert _counted(lambda: x.tolist(), x)["d2h"] == 1
    assert _counted(lambda: x.cpu().numpy(), x)["d2h"] == 1  # one copy, the host copy is host data
    assert sum(_counted(lambda: (host.tolist(), host.nonzero(), int(host.sum())), x).values()) == 0
    # a copy of host data to the device waits, unless it is non_blocking (pinned memory)
    assert _counted(lambda: host.to(torch.device("cpu")) + x, x)["h2d"] == 1
    assert _counted(lambda: host.to(torch.device("cpu"), non_blocking=True) + x, x)["h2d"] == 0
    # derived tensors are device tensors; factories too, except host generator draws
    assert _counted(lambda: (x * 2).tolist(), x)["d2h"] == 1
    assert _counted(lambda: torch.zeros(3).nonzero(), x)["shape"] == 1
    g = torch.Generator().manual_seed(0)
    assert _counted(lambda: torch.rand(3, generator=g).tolist(), x)["d2h"] == 0


def test_bench_writes_labelled_entries_and_the_planned_step_meets_the_budget(tmp_path):
    """Two labelled entries in order: the in-loss sampling ("before"), then the loader's plans, where the
    image scope's CWCL never waits on the device and SDCL at most twice (one read of its counts for all
    three levels)."""
    out = tmp_path / "hs.json"
    for label, extra in (("before", []), ("planned", ["--plans"])):
        res = subprocess.run([sys.executable, "bench/host_syncs.py", "--label", label, *extra, "--crop", "64",
                              "--scopes", "image", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "sdcl" in res.stdout
    doc = json.loads(out.read_text())
    assert [e["label"] for e in doc["entries"]] == ["before", "planned"]
    img = doc["entries"][0]["scopes"]["image"]
    assert img["total"] == sum(u["total"] for u in img["by_unit"].values())
    assert img["by_unit"]["cwcl"]["total"] > 0  # sampling in the loss reads back
    # the trainer reads the non-finite flag, then every loss term and the total in one copy
    assert img["by_unit"]["trainer"]["item"] == 1 and img["by_unit"]["trainer"]["d2h"] == 1
    units = doc["entries"][1]["scopes"]["image"]["by_unit"]
    assert units.get("cwcl", {"total": 0})["total"] == 0
    assert 1 <= units["sdcl"]["total"] <= 2, units["sdcl"]
