#!/usr/bin/env bash
# QLoRA (4-bit NF4 base) on Baichuan2 with DeepSpeed ZeRO-2 on GPUs 0 and 1.
# MODEL=/path/to/Baichuan2-13B-Chat DATA=/path/to/spo_0.json bash scripts/train_baichuan2_qlora.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deepspeed --include=localhost:0,1 train_qlora.py --train_file "${DATA:-spo_0.json}" \
  --model_name_or_path "${MODEL:?set MODEL to the Baichuan2 folder}" --trust_remote_code --template baichuan2 \
  --output_dir "${OUT:-output/baichuan2-qlora}" --prompt_column input --response_column output \
  --cache_dir goat_cache --overwrite_cache --overwrite_output_dir --max_source_length 512 \
  --max_target_length 512 --num_train_epochs 4 --gradient_accumulation_steps 4 \
  --per_device_train_batch_size 1 --warmup_ratio 0.1 --lr_scheduler_type cosine --save_total_limit 1 \
  --learning_rate 2e-5 --logging_steps 50 --save_steps 500 --lora_config configs/lora_config_baichuan2.json \
  --lora_rank 2 --fp16 --torch_dtype float16 --preprocessing_num_workers 2 --deepspeed ds_config.json
