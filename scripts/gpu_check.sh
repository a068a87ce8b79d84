#!/usr/bin/env bash
# The GPU path, checked on a machine with CUDA (scripts/gpu_check.py lists every step: training, DeepSpeed with
# LoRA, FoRA and QLoRA, the memory study against torch.cuda.max_memory_allocated, predict, merge, chat): one table,
# non-zero exit on any failure, under ten minutes on one GPU with the embedded model. Without CUDA it stops in one line.
#   bash scripts/gpu_check.sh            # work files in a temporary folder, removed at the end
#   OUT=output/gpu_check bash scripts/gpu_check.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: no NVIDIA GPU on this machine (no nvidia-smi): scripts/gpu_check.sh checks the CUDA path; the CPU path is bash scripts/test.sh" >&2
  exit 2
fi
# shellcheck disable=SC1091
. "$REPO/scripts/setup.sh"
cd "$REPO"
python scripts/gpu_check.py "$@"
