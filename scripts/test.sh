#!/usr/bin/env bash
# The test command: fast tests first, then the slow end-to-end ones (real Ray + vLLM + DeepSpeed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rc=0
$PY -m pytest -m "not slow" -q -p no:cacheprovider || rc=$?
[ $rc -eq 5 ] && rc=0
[ $rc -ne 0 ] && exit $rc
$PY -m pytest -m slow -q -p no:cacheprovider --durations=15 || rc=$?
[ $rc -eq 5 ] && rc=0
exit $rc
