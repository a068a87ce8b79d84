#!/usr/bin/env bash
# FoRA on a Qwen2 chat model with DeepSpeed ZeRO-2 on GPUs 0 and 1 (alpaca-format data).
# MODEL=/path/to/Qwen2-7B-Instruct DATA=/path/to/train.json bash scripts/train_qwen2_fora.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deepspeed --include=localhost:0,1 train_lora.py --finetuning_type fora --train_file "${DATA:?set DATA}" \
  --model_name_or_path "${MODEL:?set MODEL}" --output_dir "${OUT:-output/qwen2-fora}" \
  --max_source_length 512 --max_target_length 512 --num_train_epochs 3 --gradient_accumulation_steps 4 \
  --per_device_train_batch_size 2 --warmup_ratio 0.1 --lr_scheduler_type cosine --learning_rate 1e-4 \
  --lora_config configs/lora_config_qwen2.json --bf16 --logging_steps 10 --save_steps 500 --deepspeed ds_config.json
