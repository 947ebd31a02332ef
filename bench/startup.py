"""Start-up cost of the command line and of the config: `blindseg --help` and
`import blindseg_dist.config`, wall time over repeated fresh processes and python -X importtime's
cumulative time of blindseg_dist.config, plus whether torch gets imported and the lines of library
code; for this checkout and, with --before, another checkout of the package (e.g. an older commit
in a git worktree) measured the same way, interleaved.

    python bench/startup.py --repeats 5 [--before /tmp/before] [--out bench/results/startup.json]

Each measurement is one fresh interpreter (`python -c ...` with PYTHONPATH and the working folder
set to the checkout); the table gives the median and the minimum over --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HELP = "import sys; sys.argv = ['blindseg', '--help']\nfrom blindseg_dist.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass"
CONFIG = "import blindseg_dist.config"
TORCH = "import sys, blindseg_dist.config; print('torch' in sys.modules)"


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    return env


def wall(root: Path, code: str) -> float:
    """Seconds of one fresh `python -c code` in ``root``."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root), check=True, capture_output=True)
    return time.perf_counter() - t


def importtime_us(root: Path, module: str) -> int:
    """python -X importtime's cumulative microseconds of ``module`` (its own imports included)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=root, env=_env(root),
                         check=True, capture_output=True, text=True)
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s*(\d+) \|\s*(\d+) \|\s*(\S+)\s*$", line)
        if m and m.group(3).strip() == module:
            return int(m.group(2))
    raise RuntimeError(f"{module} not in the importtime output")


def library_lines(root: Path) -> tuple[int, int]:
    """(lines, files) of blindseg_dist/**/*.py under ``root``."""
    files = sorted((root / "blindseg_dist").rglob("*.py"))
    return sum(len(f.read_text().splitlines()) for f in files), len(files)


def measure(roots: dict[str, Path], repeats: int) -> dict:
    runs: dict[str, dict[str, list]] = {k: {"help_s": [], "config_s": [], "config_importtime_us": []} for k in roots}
    for _ in range(repeats):  # interleaved: the machine's load changes both alike
        for name, root in roots.items():
            runs[name]["help_s"].append(wall(root, HELP))
            runs[name]["config_s"].append(wall(root, CONFIG))
            runs[name]["config_importtime_us"].append(importtime_us(root, "blindseg_dist.config"))
    result = {}
    for name, root in roots.items():
        torch = subprocess.run([sys.executable, "-c", TORCH], cwd=root, env=_env(root), check=True,
                               capture_output=True, text=True).stdout.strip() == "True"
        lines, files = library_lines(root)
        r = runs[name]
        result[name] = {"root": str(root), "runs": r, "config_loads_torch": torch, "library_lines": lines,
                        "library_files": files,
                        **{f"median_{k}": statistics.median(v) for k, v in r.items()},
                        **{f"min_{k}": min(v) for k, v in r.items()}}
    return result


def table(result: dict) -> str:
    rows = ["| checkout | `blindseg --help` s (median / min) | `import blindseg_dist.config` s (median / min) "
            "| importtime of blindseg_dist.config ms (median) | config loads torch | library lines (files) |",
            "|---|---:|---:|---:|:---:|---:|"]
    for name, r in result.items():
        rows.append(f"| {name} | {r['median_help_s']:.2f} / {r['min_help_s']:.2f} | {r['median_config_s']:.3f} / "
                    f"{r['min_config_s']:.3f} | {r['median_config_importtime_us'] / 1000:.1f} | "
                    f"{'yes' if r['config_loads_torch'] else 'no'} | {r['library_lines']} ({r['library_files']}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", type=Path, help="another checkout (its root folder) to measure the same way")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = ap.parse_args(argv)
    roots = {"this checkout": ROOT}
    if args.before is not None:
        roots = {"before": args.before.resolve(), "after (this checkout)": ROOT}
    result = measure(roots, args.repeats)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
                                    "python": sys.version.split()[0], "machine": platform.machine(),
                                    "cpus": os.cpu_count(), "repeats": args.repeats, "results": result}, indent=1))
    print(f"[startup] {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
