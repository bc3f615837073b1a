#!/usr/bin/env bash
# The tests in the project's virtual environment (made or reused first; see scripts/setup_env.sh).
#
#   scripts/run_tests.sh                 # every test (CPU; GPU tests skip without CUDA)
#   scripts/run_tests.sh -k metrics -x   # arguments go to pytest
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  echo "usage: $0 [pytest arguments]"
  exit 0
fi
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PYTHON" -m pytest -q "$@"
