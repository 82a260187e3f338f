#!/usr/bin/env bash
# Run a command in a private network namespace that has only loopback (`lo`), so the kernel refuses
# any connection off this machine from every process the command starts: CLI subprocesses,
# `mlflow server`, Ray's raylets and workers, C-level sockets (gRPC, Arrow S3). `make test` runs
# the suite this way; where unshare is not allowed (not root, no user namespaces), it says so in one
# line and runs the command as is (tests/conftest.py's audit hook still guards the pytest process).
set -euo pipefail
if [ "${EMBEDTUNE_NETNS:-}" = "1" ]; then exec "$@"; fi  # already inside
probe() { unshare --net sh -c 'ip link set lo up' 2>/dev/null || unshare --net --map-root-user sh -c 'ip link set lo up' 2>/dev/null; }
if ! command -v unshare >/dev/null || ! command -v ip >/dev/null || ! probe; then
  echo "[netns] unshare --net is not allowed here: running without a network namespace (loopback-only is then checked by the audit hook only)" >&2
  exec "$@"
fi
flags=(--net)
unshare --net true 2>/dev/null || flags+=(--map-root-user)
export EMBEDTUNE_NETNS=1
exec unshare "${flags[@]}" sh -c 'ip link set lo up && exec "$@"' netns "$@"
