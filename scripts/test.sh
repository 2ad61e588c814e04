#!/usr/bin/env bash
# The test command: fast tests first, then the slow end-to-end ones (real Ray + vLLM + DeepSpeed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rc=0
t0=$SECONDS
$PY -m pytest -m "not slow" -q -p no:cacheprovider || rc=$?
echo "test.sh: fast tests took $((SECONDS - t0)) s"
[ $rc -eq 5 ] && rc=0
[ $rc -ne 0 ] && exit $rc
t0=$SECONDS
# the budget stays visible: every slow test's duration at the end of the run (docs/contributing.md)
$PY -m pytest -m slow -q -p no:cacheprovider --durations=0 --durations-min=5 || rc=$?
echo "test.sh: slow tests took $((SECONDS - t0)) s"
[ $rc -eq 5 ] && rc=0
exit $rc
