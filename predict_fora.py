"""Generate answers for a test set and score them with ROUGE-1/2/L, BLEU-4 and exact match.

    python predict_fora.py --ori_model_dir BASE --model_dir OUT --test_path spo_1.json \
        --output_dir OUT --max_len 512 --max_src_len 512
    python predict_fora.py --do_eval --checkpoint_dir OUT --dataset_dir data --dataset fault_triples_test \
        --output_dir OUT --per_device_eval_batch_size 8 --predict_with_generate

--model_dir is a LoRA, FoRA or QLoRA adapter (its base loads as it was trained, from fora_run.json),
a merged or fully fine-tuned model folder, or unset to score the base model. Prompts are built
with the training template and cut as training cuts them. Lengths follow the seed: --max_src_len
cuts the prompt, --max_len caps prompt + answer per record, --max_new_tokens caps the answer.

Writes OUTPUT_DIR/generated_predictions.jsonl ({"prompt", "predict", "label"} per record, input
order; label null where the record has no reference) and OUTPUT_DIR/predict_results.json (scores
over the records with a reference, counts, runtime, settings). Files an earlier run left there are
kept unless --overwrite_output_dir. Every flag: `python predict_fora.py --help` (fora/args/predict.py).
"""

from fora.cli import predict

if __name__ == "__main__":
    predict()
