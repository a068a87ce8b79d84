#!/usr/bin/env bash
# LoRA on ChatGLM3-6B with torchrun on 4 GPUs, PromptCBLUE-style data (input/target).
# MODEL=/path/to/chatglm3-6b DATA=/path/to/PromptCBLUE bash scripts/train_chatglm3_lora.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:?set DATA to the folder with train.json and dev.json}"
torchrun --nproc_per_node 4 train_lora.py --model_name_or_path "${MODEL:?set MODEL}" --trust_remote_code \
  --template chatglm3 --use_lora True --train_file "$DATA/train.json" --validation_file "$DATA/dev.json" \
  --cache_dir "$DATA" --prompt_column input --response_column target --output_dir "${OUT:-output/chatglm3-lora}" \
  --overwrite_output_dir --max_source_length 512 --max_target_length 64 --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 4 --gradient_accumulation_steps 16 --max_steps 10000 --logging_steps 10 \
  --save_steps 300 --learning_rate 2e-4 --lora_config configs/lora_config_chatglm3_6b.json
