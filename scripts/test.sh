#!/usr/bin/env bash
# Set up .venv/ if needed, then run the test suite. Extra arguments go to pytest.
#   bash scripts/test.sh           the whole suite (what CI runs)
#   bash scripts/test.sh --quick   every module's own tests, without the slow ones (real launchers, federated
#                                  runs, the browser, the model-family matrix, the golden runs)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$REPO/scripts/setup.sh"
cd "$REPO"
tier=()
if [ "${1:-}" = "--quick" ]; then shift; tier=(-m "not slow"); fi
python -m pytest tests -q -rs "${tier[@]}" "$@"   # -rs: the reason of every skipped test in the summary
