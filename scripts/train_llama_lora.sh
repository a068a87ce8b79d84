#!/usr/bin/env bash
# LoRA on a LLaMA-family model on one GPU (or CPU), alpaca-format data, loss curve + TensorBoard in OUT.
# MODEL=/path/to/llama DATA=/path/to/train.json bash scripts/train_llama_lora.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python train_lora.py --model_name_or_path "${MODEL:?set MODEL}" --train_file "${DATA:?set DATA}" \
  --output_dir "${OUT:-output/llama-lora}" --lora_config configs/lora_config_llama.json \
  --max_source_length 512 --max_target_length 256 --num_train_epochs 3 --per_device_train_batch_size 4 \
  --gradient_accumulation_steps 4 --learning_rate 2e-4 --warmup_ratio 0.05 --lr_scheduler_type cosine \
  --logging_steps 10 --save_steps 200 --save_total_limit 2 --bf16
