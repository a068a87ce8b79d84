"""Every fine-tuning method side by side, on the same records, steps, batch and seed.

    python scripts/compare_methods.py                       # the demo's data (data/train.json, data/test.json)
    python scripts/compare_methods.py --data authors        # ../shared/data/spo_0.json and spo_1.json
    python scripts/compare_methods.py --methods lora,fora,ia3 --steps 20

Each method trains the embedded SmolLM2-135M-Instruct with train_lora.py in a process of its own (its peak
resident memory read from the kernel when it ends), then predict_fora.py generates greedy answers for the test
split and scores them (ROUGE-L, BLEU-4, triple F1); the eval loss is the mean cross-entropy over the test
answers' tokens, computed here from each method's full logits, one way for every method. Methods that merge
are merged with merge_lora.py and the merged model's logits compared with the unmerged adapter's (the largest
difference relative to the largest logit). FoRA and LoRA are also compared at an equal number of trainable
parameters. The first row is the base model, untrained, scored the same way. Each method trains at its own
learning rate (LEARNING_RATES: the rate its paper or PEFT's examples use at this scale); everything else is
equal. Prints one Markdown table; --json writes the rows. Adapters and predictions stay in a temporary folder.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
LEARNING_RATES = {"lora": 5e-4, "fora": 5e-4, "loha": 5e-4, "lokr": 1e-3, "ia3": 3e-3, "adalora": 5e-4, "oft": 1e-4,
                  "prefix": 1e-2, "prompt": 3e-2, "freeze": 1e-4, "full": 5e-5}
RUNS = {  # row name: flags; LoRA's variants are LoRA with one flag
    "lora r8": ["--finetuning_type", "lora"],
    "lora r8 + dora": ["--finetuning_type", "lora", "--use_dora"],
    "lora r8 + rslora": ["--finetuning_type", "lora", "--use_rslora"],
    "lora r8 + pissa": ["--finetuning_type", "lora", "--init_lora_weights", "pissa"],
    "lora r8 + lora+ (16)": ["--finetuning_type", "lora", "--loraplus_lr_ratio", "16"],
    "fora r8": ["--finetuning_type", "fora"],
    "loha r8": ["--finetuning_type", "loha"],
    "lokr r8": ["--finetuning_type", "lokr"],
    "ia3": ["--finetuning_type", "ia3"],
    "adalora r8 -> 4": ["--finetuning_type", "adalora"],
    "oft (blocks of 32)": ["--finetuning_type", "oft"],
    "prefix (P-tuning v2; 16 tokens)": ["--finetuning_type", "prefix"],
    "prompt (16 tokens)": ["--finetuning_type", "prompt"],
    "freeze (last 2 layers)": ["--finetuning_type", "freeze"],
    "full": ["--finetuning_type", "full"],
}


def cell(value, spec: str) -> str:
    """A table cell: the value in `spec`, or - where a row has none (the base trains nothing; some methods don't merge)."""
    return "-" if value is None else format(value, spec)


def method_of(flags: list[str]) -> str:
    return flags[flags.index("--finetuning_type") + 1]


def run(script: str, *flags: str) -> int:
    """Run one of the root scripts to its end; returns its peak resident memory in bytes."""
    process = subprocess.Popen([sys.executable, script, *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {script} {' '.join(flags[:3])} ... failed:\n{output[-3000:]}")
    return usage.ru_maxrss * 1024


def eval_loss(folder: Path | None, test_file: str) -> float:
    """Mean cross-entropy over the answer tokens of `test_file`, from the full logits of what `folder` holds
    (None: the base model)."""
    import torch
    import torch.nn.functional as F

    from fora.data.encode import IGNORE_INDEX, tokenize_conversation
    from fora.data.formats import load_conversations
    from fora.data.templates import get_template
    from fora.models.inference import load_inference_model

    model, tokenizer, info = load_inference_model(folder and str(folder), torch_dtype="float32", merge=False)
    template = get_template(tokenizer, info.get("template"))
    conversations, _ = load_conversations(test_file)
    total, count = 0.0, 0
    with torch.no_grad():
        for c in conversations:
            row = tokenize_conversation({"where": c.where, "system": c.system, "turns": c.turns}, tokenizer, template, 1024, 256)
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[:, -ids.shape[1]:].float()  # prompt tuning's virtual tokens come first
            total += F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return total / count


def merge_error(adapter: Path, merged: Path, test_file: str) -> float:
    """The largest difference between the merged model's logits and the unmerged adapter's on a few test prompts,
    relative to the largest logit."""
    import torch

    from fora.data.formats import load_conversations
    from fora.data.templates import get_template
    from fora.infer.generate import build_prompt
    from fora.models.inference import load_inference_model

    unmerged, tokenizer, info = load_inference_model(str(adapter), torch_dtype="float32", merge=False)
    whole, _, _ = load_inference_model(str(merged), torch_dtype="float32")
    template = get_template(tokenizer, info.get("template"))
    conversations, _ = load_conversations(test_file, require_response=False)
    worst = 0.0
    with torch.no_grad():
        for c in conversations[:4]:
            ids = torch.tensor([build_prompt(tokenizer, template, c, 512, 256)[0]])
            a, b = unmerged(input_ids=ids).logits, whole(input_ids=ids).logits
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    return worst


def score(folder: Path | None, test_file: str, predict_dir: Path) -> dict:
    """Eval loss, and ROUGE-L, BLEU-4 and triple F1 of greedy answers, for what `folder` holds (None: the base)."""
    model = ["--model_dir", str(folder)] if folder else []
    run("predict_fora.py", *model, "--test_path", test_file, "--output_dir", str(predict_dir), "--max_new_tokens", "128",
        "--torch_dtype", "float32")
    scores = json.loads((predict_dir / "predict_results.json").read_text())
    return {"eval_loss": eval_loss(folder, test_file), **{k: scores.get(k) for k in ("rouge-l", "bleu-4", "triple_f1")}}


def trainable_parameters(flags: list[str], rank: int) -> int:
    """What a method trains at `rank` on the embedded model (attached, not trained)."""
    import torch

    from fora.args import FinetuningArguments
    from fora.models.load import ensure_default_model, load_model
    from fora.tuners.attach import attach_adapter, count_parameters

    model = load_model(str(ensure_default_model()), torch.float32)
    return count_parameters(attach_adapter(model, FinetuningArguments(finetuning_type=method_of(flags), lora_rank=rank)))[0]


def first_records(path: str, count: int, subset: Path) -> str:
    """The first `count` lines of a JSON Lines file, written to `subset`; returns its path."""
    subset.write_text("".join(Path(path).read_text(encoding="utf-8").splitlines(True)[:count]), encoding="utf-8")
    return str(subset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["demo", "authors"], default="demo")
    parser.add_argument("--methods", help="comma-separated row names, methods or base (the base model untrained; "
                        "default: every row)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--records", type=int, default=None, help="use the first N training records (default: all)")
    parser.add_argument("--test_records", type=int, default=None, help="score on the first N test records (default: all)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    for flag in ("steps", "records", "test_records"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    if args.data == "authors":
        if not (SHARED_DATA / "spo_0.json").is_file():
            sys.exit(f"error: {SHARED_DATA} has no spo_0.json (the FoRA authors' data)")
        train_file, test_file = str(SHARED_DATA / "spo_0.json"), str(SHARED_DATA / "spo_1.json")
    else:
        train_file, test_file = str(REPO / "data" / "train.json"), str(REPO / "data" / "test.json")
    work = Path(tempfile.mkdtemp(prefix="fora-methods-"))
    print(f"adapters and predictions: {work}", flush=True)
    if args.records:
        train_file = first_records(train_file, args.records, work / "train.jsonl")
    if args.test_records:
        test_file = first_records(test_file, args.test_records, work / "test.jsonl")
    runs = dict(RUNS)
    lora_params = trainable_parameters(RUNS["lora r8"], 8)
    fora_rank = min(range(1, 17), key=lambda r: abs(trainable_parameters(RUNS["fora r8"], r) - lora_params))
    runs[f"fora r{fora_rank} (lora r8's parameters)"] = [*RUNS["fora r8"], "--lora_rank", str(fora_rank)]
    wanted = set(args.methods.split(",")) if args.methods else None
    if wanted:
        unknown = wanted - {"base", *runs, *map(method_of, runs.values())}
        if unknown:
            sys.exit(f"error: --methods: no row or method named {', '.join(sorted(unknown))} (rows: base, {', '.join(runs)})")
        runs = {name: flags for name, flags in runs.items() if name in wanted or method_of(flags) in wanted}

    rows = []
    if wanted is None or "base" in wanted:  # where every method starts from
        print("== base", flush=True)
        rows.append({"method": "base model (not trained)", "learning_rate": None, "trainable_parameters": 0,
                     "samples_per_second": None, "peak_memory_bytes": None,
                     **score(None, test_file, work / "base"), "merge_error": None})
        print(json.dumps(rows[-1]), flush=True)
    for name, flags in runs.items():
        method = method_of(flags)
        folder = work / re.sub(r"[^A-Za-z0-9.+-]+", "_", name)  # no comma: predict_fora.py reads one as a list
        common = ["--train_file", train_file, "--output_dir", str(folder / "adapter"), "--max_steps", str(args.steps),
                  "--per_device_train_batch_size", "4", "--seed", "42", "--learning_rate", str(LEARNING_RATES[method]),
                  "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05", "--logging_steps", "10", "--save_strategy", "no",
                  "--report_to", "none", "--torch_dtype", "float32", "--lora_rank", "8", "--max_source_length", "512",
                  "--max_target_length", "256"]
        print(f"== {name}", flush=True)
        peak = run("train_lora.py", *common, *flags)
        results = json.loads((folder / "adapter" / "train_results.json").read_text())
        scores = score(folder / "adapter", test_file, folder / "predict")
        error = None
        if (folder / "adapter" / "adapter_config.json").is_file() and method not in ("prefix", "prompt"):
            run("merge_lora.py", "--adapter", str(folder / "adapter"), "--output_dir", str(folder / "merged"),
                "--dtype", "float32")
            error = merge_error(folder / "adapter", folder / "merged", test_file)
        rows.append({
            "method": name, "learning_rate": LEARNING_RATES[method], "trainable_parameters": results["trainable_parameters"],
            "samples_per_second": results["train_samples_per_second"], "peak_memory_bytes": peak,
            **scores, "merge_error": error,
        })
        print(json.dumps(rows[-1]), flush=True)

    header = ["method", "lr", "trainable", "samples/s", "peak GB", "eval loss", "ROUGE-L", "BLEU-4", "triple F1", "merge error"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        peak = row["peak_memory_bytes"] and row["peak_memory_bytes"] / 2**30
        cells = [row["method"], cell(row["learning_rate"], "g"), cell(row["trainable_parameters"], ","),
                 cell(row["samples_per_second"], ".2f"), cell(peak, ".2f"), cell(row["eval_loss"], ".4f"),
                 *(cell(row[k], ".2f") for k in ("rouge-l", "bleu-4", "triple_f1")), cell(row["merge_error"], ".1e")]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "data": args.data, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
