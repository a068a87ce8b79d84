#!/usr/bin/env bash
# Set up .venv/ if needed, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$REPO/scripts/setup.sh"
cd "$REPO"
python -m pytest tests -q -rs "$@"   # -rs: the reason of every skipped test in the summary
