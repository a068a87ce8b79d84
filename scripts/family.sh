#!/usr/bin/env bash
# Train, predict or merge one model family: sourced by the per-model scripts in scripts/models/, which set
#   NAME  TEMPLATE  LORA_CONFIG  TRUST (--trust_remote_code where the folder ships its own code)
# Usage, for any of them:
#   MODEL=/path/to/model DATA=train.json bash scripts/models/NAME.sh train
#   MODEL=/path/to/model TEST=test.json  bash scripts/models/NAME.sh predict
#   MODEL=/path/to/model                 bash scripts/models/NAME.sh merge
# Environment: OUT (default output/NAME; the adapter goes to OUT/adapter, scores to OUT/predict, the merged
# model to OUT/merged), GPUS (train with deepspeed ZeRO-2 on that many GPUs; unset: one process),
# QLORA=1 (4-bit NF4 base: train_qlora.py), PRECISION (default --bf16; without CUDA it falls back to
# what the CPU has), EXTRA (more flags for the step, e.g. "--max_steps 10").
set -euo pipefail
STEP="${1:?usage: $0 train|predict|merge}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-output/$NAME}"
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
read -r -a TRUST_FLAG <<< "${TRUST:-}"
read -r -a PRECISION_FLAG <<< "${PRECISION---bf16}"
TRAIN_SCRIPT="$([ "${QLORA:-}" = 1 ] && echo train_qlora.py || echo train_lora.py)"

case "$STEP" in
  train)
    LAUNCH=(python)
    DEEPSPEED=()
    if [ -n "${GPUS:-}" ]; then LAUNCH=(deepspeed --num_gpus "$GPUS"); DEEPSPEED=(--deepspeed ds_config.json); fi
    "${LAUNCH[@]}" "$TRAIN_SCRIPT" --model_name_or_path "${MODEL:?set MODEL to the $NAME folder}" "${TRUST_FLAG[@]}" \
      --template "$TEMPLATE" --lora_config "configs/$LORA_CONFIG" --train_file "${DATA:?set DATA to the training file}" \
      --output_dir "$OUT/adapter" --overwrite_output_dir --max_source_length 512 --max_target_length 512 \
      --num_train_epochs 3 --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --learning_rate 2e-4 \
      --warmup_ratio 0.1 --lr_scheduler_type cosine --logging_steps 10 --save_steps 500 --save_total_limit 1 \
      "${PRECISION_FLAG[@]}" "${DEEPSPEED[@]}" "${EXTRA_FLAGS[@]}"
    ;;
  predict)
    # The base, dtype, quantization and template come from the adapter's fora_run.json.
    python predict_fora.py --model_dir "$OUT/adapter" "${TRUST_FLAG[@]}" --test_path "${TEST:?set TEST to the test file}" \
      --output_dir "$OUT/predict" --overwrite_output_dir --max_new_tokens 512 "${EXTRA_FLAGS[@]}"
    ;;
  merge)
    python merge_lora.py --adapter "$OUT/adapter" --output_dir "$OUT/merged" "${TRUST_FLAG[@]}" --overwrite_output_dir \
      "${EXTRA_FLAGS[@]}"
    ;;
  *)
    echo "usage: $0 train|predict|merge" >&2
    exit 2
    ;;
esac
