#!/usr/bin/env bash
# The sm_90 compile table with the GPU machine's Triton (3.6), on any CPU machine:
#
#   bash benchmarks/compile_sm90.sh [--quick] [--out FILE]
#
# Triton 3.6 is installed once into ./.triton36 (a wheel folder, git-ignored, ~640 MB with its ptxas)
# with `pip install --no-deps --target .triton36 triton==3.6.0` and put first on PYTHONPATH, so the
# project's own venv (torch, and its own newer Triton for everything else) stays as it is. Torch never
# imports Triton here: only the compiler is used. Writes benchmarks/results/compile_sm90.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
if ! PYTHONPATH=.triton36 "$PY" -c "import triton, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --target .triton36 "triton==3.6.0"
fi
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)}"  # cold compiles: the table is this run's
PYTHONPATH=".triton36${PYTHONPATH:+:$PYTHONPATH}" nice -n 10 "$PY" benchmarks/compile_sm90.py --require-triton 3.6 "$@"
