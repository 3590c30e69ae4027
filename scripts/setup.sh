#!/usr/bin/env bash
# Create .venv and install the project with its extras (default: everything a developer and CI need on CPU).
#   AEGIS_EXTRAS=cpu,serve scripts/setup.sh    # a serving-only install: no torch
#   AEGIS_EXTRAS=gpu,serve scripts/setup.sh    # GPU serving (onnxruntime-gpu; never together with `cpu`)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${AEGIS_EXTRAS:-cpu,serve,train,dev}]"
.venv/bin/python - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("onnxruntime") is None:
    sys.exit("onnxruntime is missing: install exactly one of the `cpu` or `gpu` extras")
print("environment ready:", sys.prefix)
PY
