"""Helpers for the engine tests: tiny shards and `blindseg train` runs under `accelerate launch`.

Every run is a real launch (gloo on the CPU, 1 thread per process, resnet18, crop 64, batch 2).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from blindseg_dist.launcher import blindseg_command, launch_env

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TINY = ["data.crop_size=64", "data.batch_size=2", "data.num_workers=0", "run.log_every=1", "run.threads=1",
        "eval.at_end=false"]


def tiny_shards(root: Path) -> Path:
    """8 synthetic 64x128 frames in 4 shards of 2 (written once per folder)."""
    out = root / "shards"
    if not (out / "manifest.json").is_file():
        from blindseg_dist.data.shards import write_shards
        from blindseg_dist.data.sources import get_source
        from blindseg_dist.data.synth import generate

        generate(root / "synth", domains=2, images_per_domain=8, size=(64, 128), seed=0)
        write_shards(get_source("gta5", root / "synth" / "gta5", split="all"), out, samples_per_shard=2, progress=False)
    return out


def env(cpu: bool = True, **extra: str) -> dict[str, str]:
    """The launch environment (1 thread, offline) with only the BLINDSEG_FAULT_* variables in ``extra``."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}
    for k in [k for k in e if k.startswith("BLINDSEG_FAULT_")]:
        if k not in extra:
            del e[k]
    return launch_env(cpu=cpu, base=e)


def train_cmd(out: Path, shards: Path, steps: int, *overrides: str, processes: int = 2, machines: int = 1,
              machine_rank: int = 0, port: int | None = None, config_file: Path | None = None,
              resume: bool = False, launcher: str = "accelerate") -> list[str]:
    args = ["train", "--config", str(ROOT / "configs/demo.yaml"), "--output-dir", str(out), "--max-steps", str(steps),
            f"data.train={shards}", *TINY, *overrides, *(["--resume"] if resume else [])]
    return blindseg_command(args, processes=processes, machines=machines, machine_rank=machine_rank, port=port,
                            config_file=config_file, launcher=launcher)


def run(cmd: list[str], e: dict[str, str], timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    t = time.perf_counter()
    res = subprocess.run(cmd, env=e, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    res.seconds = time.perf_counter() - t  # type: ignore[attr-defined]
    return res


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def tail(res: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={res.returncode}\n--- stdout\n{res.stdout[-n:]}\n--- stderr\n{res.stderr[-n:]}"
