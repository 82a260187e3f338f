#!/usr/bin/env bash
# `make test`: the suite (all but the `registry` tests) as two pytest sessions at once, each in its
# own loopback-only network namespace (scripts/netns.sh): the cluster end-to-end modules (a whole
# S3 + PostgreSQL + MLflow + autoscaling Ray stand-in, the launcher file over SSH), which spend
# much of their time waiting on servers, autoscaling and jobs, beside everything else. Separate
# namespaces, so the launcher's fixed ports never meet another test's servers. Each session prints
# its own summary and 25 slowest tests; the last lines are the wall time and the combined count.
# The `registry` tests (pip installs from the package registry, so outside the namespaces) run
# beside both: they mostly wait on downloads.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# The second session: the cluster end-to-end modules, plus modules with no session fixture to
# share (LanceDB ingest, the cross-encoder, Matryoshka, auto search, the final stage, the served
# winner, the S3 lease, result-logger and credential tests, which mostly wait on their S3 server,
# the private-Ray tests, which mostly wait on Ray's processes, and the second-seed sweep) so that
# both sessions end nearer the same time (the last full run before the second-seed sweep moved:
# the rest 30.0 min, this one 27.8 min; that test took 2.1 min).
CLUSTER=(tests/test_cluster_local.py tests/test_launcher.py tests/test_index.py tests/test_rerank.py
  tests/test_matryoshka.py tests/test_auto_search.py tests/test_final.py tests/test_serve.py
  tests/test_lease.py tests/test_result_loggers.py tests/test_credentials.py tests/test_ray_env.py
  tests/test_second_seed.py)
# The two sessions share 2 cores: OpenMP threads that spin while waiting for a core the other
# session holds made torch work about 1.7x slower than one thread each; passive waiting keeps both
# sessions at full speed and a session alone on the machine still uses both cores.
export OMP_WAIT_POLICY=PASSIVE
pytest_cmd=(env EMBEDTUNE_OFFLINE=1 "$PY" -m pytest -v -rs --durations=25 -m "not registry" -p no:cacheprovider)
started=$(date +%s)
rest_log=$(mktemp)
cluster_log=$(mktemp)
registry_log=$(mktemp)
trap 'rm -f "$rest_log" "$cluster_log" "$registry_log"' EXIT

env EMBEDTUNE_OFFLINE=1 "$PY" -m pytest -v -rs -m registry -p no:cacheprovider >"$registry_log" 2>&1 &
registry_pid=$!
scripts/netns.sh "${pytest_cmd[@]}" "${CLUSTER[@]}" >"$cluster_log" 2>&1 &
cluster_pid=$!
ignores=()
for t in "${CLUSTER[@]}"; do ignores+=("--ignore=$t"); done
scripts/netns.sh "${pytest_cmd[@]}" "${ignores[@]}" 2>&1 | tee "$rest_log"
rest_rc=${PIPESTATUS[0]}
wait "$cluster_pid"
cluster_rc=$?
wait "$registry_pid"
registry_rc=$?
echo
echo "======== the second session (${CLUSTER[*]}), run beside the one above ========"
cat "$cluster_log"
echo
echo "======== the registry tests (-m registry, outside the namespaces), run beside both ========"
cat "$registry_log"

total() {  # the sum over every session's summary lines of the counts named $1 (e.g. passed)
  local n=0 line v
  for log in "$rest_log" "$cluster_log" "$registry_log"; do
    line=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -n 1)
    v=$(grep -oE "[0-9]+ $1" <<<"$line" | grep -oE '^[0-9]+' | head -n 1)
    n=$((n + ${v:-0}))
  done
  echo "$n"
}
crashed() {  # a session killed by a signal prints no summary: show where it died (faulthandler's
  # "Fatal Python error" traceback and the test it was in) at the end, where CI's tail shows it
  local name=$1 rc=$2 log=$3
  if [ "$rc" -ge 128 ]; then
    echo
    echo "[make test] the $name session was killed by signal $((rc - 128)); the end of its output:"
    grep -nE "Fatal Python error|^tests/.*::" "$log" | tail -n 3
    tail -n 80 "$log"
  fi
}
crashed suite "$rest_rc" "$rest_log"
crashed cluster "$cluster_rc" "$cluster_log"
crashed registry "$registry_rc" "$registry_log"
elapsed=$(($(date +%s) - started))
echo "[make test] all sessions done in $((elapsed / 60)) min $((elapsed % 60)) s (exit codes: suite $rest_rc, cluster $cluster_rc, registry $registry_rc)"
echo "$(total passed) passed, $(($(total failed) + $(total error))) failed, $(total skipped) skipped"
if [ "$rest_rc" -ne 0 ] || [ "$cluster_rc" -ne 0 ] || [ "$registry_rc" -ne 0 ]; then exit 1; fi
