#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the pinned stack (requirements/pinned.txt, then
# requirements/nodeps.txt without the dependencies those packages declare) and the project installed
# in editable mode. Idempotent: a second run only reinstalls when requirements/ or pyproject.toml changed. Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.blindseg-installed
want=$(cat requirements/pinned.txt requirements/nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
pip_install() {  # quiet pip that still fails loudly, with its log, when pip fails
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install --quiet "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2; rm -f "$log"
    echo "[setup] pip install $* failed" >&2; exit 1
  fi
  rm -f "$log"
}
echo "[setup] installing the pinned stack (a few minutes on a cold machine)"
pip_install --upgrade pip
pip_install -r requirements/pinned.txt
pip_install --no-deps -r requirements/nodeps.txt  # their declared opencv-python would be a second cv2
pip_install --no-deps --no-build-isolation -e .
cv2_dists=$(.venv/bin/python -c 'import importlib.metadata as m; print(" ".join(sorted(set(m.packages_distributions().get("cv2", [])))))')
if [ "$cv2_dists" != "opencv-python-headless" ]; then
  echo "[setup] cv2 comes from: ${cv2_dists:-nothing}; expected opencv-python-headless alone (pip uninstall the others)" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, blindseg_dist; print("torch", torch.__version__, "blindseg_dist", blindseg_dist.__version__)')"
