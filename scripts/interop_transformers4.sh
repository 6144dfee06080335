#!/usr/bin/env bash
# The transformers-integration tests (tests/test_hf_*.py, and the serving engine's cache use) against the other transformers major line (4.5x),
# in a second virtual environment (docs/interop.md). CI runs this next to the main suite (transformers 5.x).
#   scripts/interop_transformers4.sh            # creates .venv-tf4 once, then runs the tests
#   VENV=/path/to/venv PYTHON=python3.11 scripts/interop_transformers4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-tf4}
PYTHON=${PYTHON:-python3}
if [ ! -f "$VENV/.wct-tf4-installed" ] || [ pyproject.toml -nt "$VENV/.wct-tf4-installed" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e '.[dev]' 'transformers>=4.57,<5'
  touch "$VENV/.wct-tf4-installed"
fi
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -m "not slow" tests/test_hf_loading.py tests/test_serve_engine.py tests/test_decoding.py "$@"
