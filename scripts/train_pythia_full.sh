#!/usr/bin/env bash
# Full fine-tuning (no adapter) of a small Pythia model with torchrun on 2 GPUs.
# MODEL=/path/to/pythia-410m DATA=/path/to/train.json bash scripts/train_pythia_full.sh
set -euo pipefail
cd "$(dirname "$0")/.."
torchrun --nproc_per_node 2 train_lora.py --use_lora False --model_name_or_path "${MODEL:?set MODEL}" \
  --train_file "${DATA:?set DATA}" --template default --output_dir "${OUT:-output/pythia-full}" \
  --max_source_length 256 --max_target_length 256 --num_train_epochs 2 --per_device_train_batch_size 8 \
  --learning_rate 1e-5 --warmup_ratio 0.03 --logging_steps 10 --save_steps 500 --save_total_limit 1 --bf16
