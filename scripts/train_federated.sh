#!/usr/bin/env bash
# Federated LoRA on the embedded model, simulated on this machine: data/train.json split across 3 clients,
# 5 rounds, the global adapter scored on data/test.json after every round (output/federated/).
# CLIENTS=3 ROUNDS=5 PARTITION=iid bash scripts/train_federated.sh [more train_federated.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python train_federated.py --train_file data/train.json --validation_file data/test.json \
  --num_clients "${CLIENTS:-3}" --num_rounds "${ROUNDS:-5}" --partition "${PARTITION:-iid}" --local_steps 20 \
  --per_device_train_batch_size 4 --learning_rate 1e-3 --lr_scheduler_type constant \
  --lora_config configs/lora_config_smollm2.json --max_source_length 256 --max_target_length 128 \
  --output_dir "${OUT:-output/federated}" --overwrite_output_dir --report_to none "$@"
