"""Generate answers for a test set and score them with ROUGE-1/2/L, BLEU-4 and exact match.

    python predict_fora.py --ori_model_dir BASE --model_dir OUT --test_path spo_1.json \
        --output_dir OUT --max_len 512 --max_src_len 512
    python predict_fora.py --do_eval --checkpoint_dir OUT --dataset_dir data --dataset fault_triples_test \
        --output_dir OUT --per_device_eval_batch_size 8 --predict_with_generate

--model_dir is a LoRA, FoRA or QLoRA adapter (its base loads as it was trained, from fora_run.json),
a merged or fully fine-tuned model folder, or unset to score the base model. Prompts are built
with the training template and cut as training cuts them. Lengths follow the seed: --max_source_length
(the seed's --max_src_len) cuts the prompt, --max_len caps prompt + answer per record, --max_new_tokens
caps the answer.

Writes OUTPUT_DIR/generated_predictions.jsonl ({"prompt", "predict", "label"} per record, input
order; label null where the record has no reference) and OUTPUT_DIR/predict_results.json (scores
over the records with a reference, counts, runtime, settings). Files an earlier run left there are
kept unless --overwrite_output_dir. Every flag: `python predict_fora.py --help` (fora/args/predict.py).
"""

import json
import sys
import time
from pathlib import Path

from transformers import set_seed

from fora import metrics
from fora.args import PredictArguments, parse_args
from fora.data.formats import load_conversations
from fora.data.templates import get_template
from fora.errors import UserError
from fora.infer import generate
from fora.io import refuse_earlier_output, write_json, write_text
from fora.memory.decide import generation_out_of_memory_line
from fora.models.inference import describe_loaded, load_inference_model
from fora.run import RunRecord

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"
OUTPUT_FILES = (PREDICTIONS_FILE, RESULTS_FILE)
AUTO_BATCH_SIZE = 64  # where the automatic --batch_size starts; halved on out-of-memory


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((PredictArguments,), argv)

    # 1. Where to write: never over an earlier run's files.
    output_dir = Path(args.output_dir)
    refuse_earlier_output(output_dir, OUTPUT_FILES, args.overwrite_output_dir, " or choose another --output_dir")
    if args.padding_side == "right":
        print("note: generation pads prompts on the left; --padding_side right applies to training only")

    # 2. Test data, checked before any model is loaded.
    record = RunRecord.load(args.model_dir) if args.model_dir and Path(args.model_dir).is_dir() else None
    conversations, _ = load_conversations(
        args.test_path,
        args.data_format,
        args.prompt_column or (record and record.prompt_column),
        args.response_column or (record and record.response_column),
        require_response=False,
    )
    conversations = conversations[: args.max_samples]
    labels = [c.turns[-1][1] for c in conversations]

    # 3. Model, tokenizer and template, as training left them.
    model, tokenizer, info = load_inference_model(
        args.model_dir, args.ori_model_dir, args.torch_dtype, args.trust_remote_code, args.quantization_bit
    )
    template = get_template(tokenizer, args.template or info.get("template"))
    print(f"Scoring {describe_loaded(args.model_dir, info)}; prompt template: {template.name}")

    # 4. Prompts, cut as in training, and each record's token budget.
    max_source_length, max_target_length = generate.inference_lengths(args.max_source_length, info)
    built = [generate.build_prompt(tokenizer, template, c, max_source_length, max_target_length) for c in conversations]
    prompts = [ids for ids, _ in built]
    truncated = sum(cut for _, cut in built)
    budgets = [token_budget(len(p), args, max_target_length) for p in prompts]
    print(f"Test records: {len(prompts)} from {args.test_path}"
          + (f"; {truncated} prompts cut to --max_source_length {max_source_length} (the end of the user's text; the template "
             "stays whole)" if truncated else ""))
    warn_short_budgets(budgets, args, max_target_length)

    # 5. Generate.
    set_seed(args.seed)
    config = generate.generation_config(
        tokenizer, template.stop_token_ids(tokenizer), args.do_sample, args.num_beams, args.temperature, args.top_p,
        model=model if args.use_model_generation_config else None,
    )
    # Without --batch_size, the largest batch that fits: from AUTO_BATCH_SIZE down, halved where memory runs out.
    sizes = [args.batch_size or min(AUTO_BATCH_SIZE, len(prompts))]

    def shrink(old: int, new: int) -> None:
        print(f"note: out of memory at --batch_size {old}; the remaining prompts at {new}", file=sys.stderr)
        sizes.append(new)

    started = time.perf_counter()
    try:
        new_ids = generate.generate_ids(
            model, tokenizer, prompts, template.stop_token_ids(tokenizer), budgets, sizes[0], config,
            on_shrink=None if args.batch_size else shrink,
        )
    except (RuntimeError, MemoryError) as error:  # a fixed --batch_size, or batch 1, still out of memory: one line
        if not generate.out_of_memory(error):
            raise
        del error
        generate.release_device_memory()
        raise UserError(generation_out_of_memory_line(model, sizes[-1], max(map(len, prompts)), max(budgets))) from None
    runtime = time.perf_counter() - started
    predictions = [generate.decode(tokenizer, ids) for ids in new_ids]

    # 6. Score the records that have a reference.
    scores = metrics.score_predictions(predictions, labels)

    # 7. Save, then report.
    records = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=False), "predict": pred, "label": label}
        for p, pred, label in zip(prompts, predictions, labels)
    ]
    results = {
        **scores,
        "prompts_truncated": truncated,
        "generated_tokens": sum(map(len, new_ids)),
        "predict_runtime": round(runtime, 4),
        "predict_samples_per_second": round(len(prompts) / runtime, 3) if runtime else None,
        "test_path": args.test_path,
        "model_dir": args.model_dir,
        "model_kind": info["model_kind"],
        "base_model": info["base_model"],
        "finetuning_type": info.get("finetuning_type") if info["model_kind"] == "adapter" else None,
        "quantization_bit": info["quantization_bit"],
        "torch_dtype": info["torch_dtype"],
        "template": template.name,
        "generation": {
            "max_src_len": max_source_length,  # the seed's name for it, kept in the file
            "max_len": args.max_len,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": sizes[-1],
            "do_sample": args.do_sample,
            "num_beams": args.num_beams,
            **({"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed} if args.do_sample else {}),
        },
    }
    refuse_earlier_output(output_dir, OUTPUT_FILES, args.overwrite_output_dir)  # in case another run wrote there meanwhile
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / PREDICTIONS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json(output_dir / RESULTS_FILE, results)

    name = Path(args.model_dir).name if args.model_dir else "base model"
    print(metrics.format_score_table({name: scores}))
    unscored = scores["total"] - scores["scored"]
    print(f"Scored {scores['scored']} of {scores['total']} records"
          + (f" ({unscored} have no reference: predicted, not scored)" if unscored else "")
          + f"; {len(prompts) / runtime:.2f} samples/s")
    print(f"Predictions: {output_dir / PREDICTIONS_FILE}; scores: {output_dir / RESULTS_FILE}")
    return results


def token_budget(prompt_length: int, args: PredictArguments, max_target_length: int) -> int:
    """Tokens a record may generate: --max_new_tokens and --max_len minus its prompt, at least 1."""
    limits = [args.max_new_tokens] if args.max_new_tokens else []
    if args.max_len:
        limits.append(args.max_len - prompt_length)
    return max(1, min(limits or [max_target_length]))


def warn_short_budgets(budgets: list[int], args: PredictArguments, max_target_length: int) -> None:
    """Say when --max_len leaves prompts less room than the answers were trained with (or were asked for)."""
    wanted = args.max_new_tokens or max_target_length
    short = [b for b in budgets if b < wanted]
    if args.max_len and short:
        print(
            f"warning: --max_len {args.max_len} (prompt + answer) leaves {len(short)} of {len(budgets)} records "
            f"fewer than {wanted} new tokens (the fewest: {min(short)}); raise --max_len or lower --max_source_length",
            file=sys.stderr,
        )
