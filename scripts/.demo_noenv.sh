#!/usr/bin/env bash
# The demo: set up .venv/, then score the embedded SmolLM2-135M-Instruct on data/test.json, fine-tune
# a LoRA adapter on data/train.json, score again, and print both rows side by side.
# Outputs in output/demo/ (OUT=... to change). Takes about ten minutes on 2 CPU cores.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-output/demo}"
PREDICT=(--test_path data/test.json --max_src_len 512 --max_new_tokens 64 --overwrite_output_dir)

echo "== 1/3 Score the base model"
python predict_fora.py "${PREDICT[@]}" --output_dir "$OUT/before"

echo "== 2/3 Fine-tune a LoRA adapter"
python train_lora.py --train_file data/train.json --output_dir "$OUT/adapter" --overwrite_output_dir \
  --lora_rank 8 --learning_rate 5e-4 --lr_scheduler_type cosine --warmup_ratio 0.05 \
  --per_device_train_batch_size 4 --max_steps "${DEMO_STEPS:-60}" --logging_steps 5 --save_strategy no

echo "== 3/3 Score the fine-tuned model"
python predict_fora.py "${PREDICT[@]}" --model_dir "$OUT/adapter" --output_dir "$OUT/after"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from fora.metrics import format_score_table
out = Path(sys.argv[1])
rows = {name: json.loads((out / name / "predict_results.json").read_text()) for name in ("before", "after")}
print(format_score_table({"base model": rows["before"], "fine-tuned": rows["after"]}))
print(f"Adapter: {out / 'adapter'}   loss curve: {out / 'adapter' / 'training_loss.png'}")
PY
