#!/usr/bin/env bash
# GPU readiness check (docs/BENCHMARKS.md, "On a GPU"): one CUDA GPU, < 8 min, one JSON + a table.
#   bench/gpu_check.sh [--out bench/results/gpu_check.json]
#   bench/gpu_check.sh --cpu-smoke [--out PATH]   # same code on the CPU, tiny sizes, < 2 min (CI)
# PYTHON overrides the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" bench/gpu_check.py "$@"
