"""Speed benchmark: the project's training and prediction paths against the stock recipes, side by side.

    python scripts/bench.py            # the full setting below (about an hour on 2 cores)
    python scripts/bench.py --quick    # the same sections on a few records (under 5 minutes)
    python scripts/bench.py --sections train,predict --records 48

Everything runs in this one process, on identical samples, one after the other:
  peak     the best matrix-multiply rate of this machine in float32 and bfloat16 (MFU denominators)
  parity   the loss of both training paths on one identical first batch, fresh adapter
  train    train_lora.py's main() (the project: length-grouped batches, logits and loss only at
           supervised positions with their gradients taken in the same pass, the adapter added
           inside one addmm, no padding mask, no gradient checkpointing) vs the stock recipe (plain HF Trainer +
           PEFT, gradient checkpointing on, DataCollatorForSeq2Seq, batches in data order, logits over
           the whole vocabulary at every position) for LoRA r8, FoRA r2 and QLoRA (4-bit NF4 base; the
           project's QLoRA both with its memory-lean default and with --unmap_freed_memory False);
           the first --records records of ../shared/data/spo_0.json, cutoff 1024 (prompt 768 +
           answer 256), batch 4, one epoch. Eval loss after training: the 50 records of spo_1.json,
           mean over answer tokens, by one independent full-logits computation for every adapter.
  ablate   the project's LoRA run with one optimisation turned off at a time
  predict  predict_fora.py's main() in float32 at --batch_size 8 and 32 (shared prompt prefix
           encoded once, the rest in length-sorted chunks, one reserved KV cache per batch, early
           stop) vs a one-record-at-a-time generate() loop, greedy, 128 new tokens, on spo_1.json
  scaling  training tokens/s on rows of exactly 256 / 512 / 1024 / 2048 tokens (4096 per batch)
Quick checks that every path runs, its figures are not the benchmark: 4 training records (one
step), 4 held-out, 4 predictions of 16 tokens, rows of 256 and 512, no ablations.
Both training paths run in bf16 where the machine has it natively (the stock recipe's bf16 weights;
the project with --bf16, as the launcher scripts pass it: bf16 weights, autocast), else in float32,
so the ratio measures the recipes, not the dtype.

Useful FLOPs (MFU numerator) count only what a LoRA step must do for the non-pad tokens: the block
linears forward and backward to their input (4 x parameters per token; frozen weights need no weight
gradient), attention scores and mixing (12 x layers x width x context per token, causal), and the
output layer for the supervised tokens only (4 x vocab x width each).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fora.data.dataset import build_dataset
from fora.models.host_memory import release_freed_memory, return_large_frees_to_system
from fora.models.inference import load_inference_model
from fora.models.load import ensure_default_model, load_model
from fora.models.tokenizer import load_tokenizer
from fora.train.loss import HeadCrossEntropy
from fora.tuners import lora_fast
from fora.tuners.attach import attach_adapter, load_adapter

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

SECTIONS = ("peak", "parity", "train", "ablate", "predict", "scaling")


@dataclass
class Setting:
    records: int = 200  # training records, from the start of spo_0.json
    eval_records: int = 50  # held-out records (spo_1.json) for eval loss
    predict_records: int = 50
    new_tokens: int = 128
    scaling_lengths: tuple = (256, 512, 1024, 2048)
    scaling_tokens: int = 4096  # per batch, at every row length
    scaling_steps: int = 3  # timed steps per row length (after one warm-up step)
    variants: tuple = ("lora", "fora", "qlora")


QUICK = Setting(
    records=4, eval_records=4, predict_records=4, new_tokens=16,
    scaling_lengths=(256, 512), scaling_tokens=512, scaling_steps=1, variants=("lora",),
)
QUICK_SECTIONS = ("peak", "parity", "train", "predict", "scaling")
SOURCE_LENGTH, TARGET_LENGTH, BATCH = 768, 256, 4  # cutoff 1024
PREDICT_BATCHES = (8, 32)
PREDICT_DTYPE = "float32"
LEARNING_RATE, SEED = 2e-4, 42


# ---------------------------------------------------------------------------------------------------
# Measuring: peak matmul rate, resident memory, useful FLOPs.


def peak_matmul_rate(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best GFLOP/s of a few large matrix multiplies (the shapes a transformer step is made of)."""
    best = 0.0
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 576), (1024, 1024, 1024), (4096, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        F.linear(a, b)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            F.linear(a, b)
            runs += 1
        best = max(best, 2 * m * k * n * runs / (time.perf_counter() - started) / 1e9)
    return best


def reset_peak_memory() -> None:
    """Start a new resident-memory high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    release_freed_memory()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


@dataclass
class ModelShape:
    block_params: int  # weights of the linear layers inside the blocks
    head_params: int  # vocab x width
    layers: int
    attention_width: int  # heads x head dim

    @classmethod
    def of(cls, config) -> "ModelShape":
        width, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or width // heads
        kv = config.num_key_value_heads * head_dim
        per_layer = width * heads * head_dim * 2 + width * kv * 2 + 3 * width * config.intermediate_size
        return cls(per_layer * config.num_hidden_layers, config.vocab_size * width, config.num_hidden_layers, heads * head_dim)

    def useful_flops(self, length: int, supervised: int) -> float:
        """FLOPs a LoRA training step must spend on one sequence (see the module docstring)."""
        attention = 12 * self.layers * self.attention_width * length * (length + 1) / 2
        return 4 * self.block_params * length + attention + 4 * self.head_params * supervised


# ---------------------------------------------------------------------------------------------------
# Data: one tokenization, shared by every run.


def write_records(source: Path, count: int, target: Path) -> Path:
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def tokenize(path: Path, tokenizer, template, cache_dir: Path):
    from fora.args import DataArguments

    args = DataArguments(train_file=str(path), max_source_length=SOURCE_LENGTH, max_target_length=TARGET_LENGTH, cache_dir=str(cache_dir))
    return build_dataset(str(path), tokenizer, template, args, lambda desc: contextlib.nullcontext(), lambda *_: None)


def supervised_count(sample: dict) -> int:
    return sum(label != -100 for label in sample["labels"][1:])


# ---------------------------------------------------------------------------------------------------
# Training: the project's entry point and the stock recipe.


def half_precision() -> bool:
    """bf16 for both recipes: on CUDA, or on a CPU that multiplies bf16 natively."""
    from fora.precision import cpu_has_bf16

    return torch.cuda.is_available() or cpu_has_bf16()


def project_argv(train_file: Path, output_dir: Path, cache_dir: Path, variant: str, *extra: str) -> list[str]:
    argv = [
        "--train_file", str(train_file), "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--cache_dir", str(cache_dir), "--max_source_length", str(SOURCE_LENGTH), "--max_target_length", str(TARGET_LENGTH),
        "--per_device_train_batch_size", str(BATCH), "--num_train_epochs", "1", "--learning_rate", str(LEARNING_RATE),
        "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--seed", str(SEED),
        "--finetuning_type", "fora" if variant == "fora" else "lora", "--lora_rank", "2" if variant == "fora" else "8",
    ]
    return argv + (["--bf16"] if half_precision() else []) + list(extra)


def run_project(train_file: Path, output_dir: Path, cache_dir: Path, variant: str, *extra: str) -> dict:
    from fora.train import recipe as train_lora

    reset_peak_memory()
    with contextlib.redirect_stdout(sys.stderr):  # keep the table on stdout readable
        train_lora.main(project_argv(train_file, output_dir, cache_dir, variant, *extra), 4 if variant == "qlora" else None)
    results = json.loads((output_dir / "train_results.json").read_text())
    return {
        "runtime": results["train_runtime"],
        "samples": results["train_samples_per_second"] * results["train_runtime"],
        "real_tokens": results["num_input_tokens_seen"],
        "pad_fraction": results["pad_fraction"],
        "peak_gb": peak_memory_gb(),
        "train_loss": results["train_loss"],
        "adapter": output_dir,
    }


class CountingCollator:
    """Wraps a collator and counts real and padded tokens of the batches it makes."""

    def __init__(self, collator):
        self.collator, self.real, self.total = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.real += int(batch["attention_mask"].sum())
        self.total += batch["attention_mask"].numel()
        return batch


def stock_peft_config(variant: str):
    from peft import LoraConfig

    from fora.tuners.fora import ForaConfig

    common = dict(lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")  # PEFT's dropout default: 0
    return ForaConfig(r=2, **{**common, "lora_alpha": 4}) if variant == "fora" else LoraConfig(r=8, **common)


def run_stock(model_path: str, dataset, tokenizer, output_dir: Path, variant: str) -> dict:
    """The textbook recipe: from_pretrained, PEFT, HF Trainer with gradient checkpointing, data order."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    reset_peak_memory()
    dtype = torch.bfloat16 if half_precision() else torch.float32
    quantization = None
    if variant == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization_config=quantization)
    if variant == "qlora":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)
    model = get_peft_model(model, stock_peft_config(variant))
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LEARNING_RATE,
        logging_steps=5, save_strategy="no", report_to="none", seed=SEED, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, train_sampling_strategy="sequential",
        bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
    )
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=args, train_dataset=dataset.remove_columns("length"), data_collator=collator)
    with contextlib.redirect_stdout(sys.stderr):
        metrics = trainer.train().metrics
    model.save_pretrained(output_dir)
    peak = peak_memory_gb()
    del trainer, model
    return {
        "runtime": metrics["train_runtime"],
        "samples": metrics["train_samples_per_second"] * metrics["train_runtime"],
        "real_tokens": collator.real,
        "pad_fraction": 1 - collator.real / collator.total,
        "peak_gb": peak,
        "train_loss": metrics["train_loss"],
        "adapter": output_dir,
    }


def heldout_loss(model_path: str, adapter: Path, samples, quantization_bit: int | None) -> float:
    """Mean next-token loss over the answer tokens of `samples`, full logits, one record at a time."""

    # Not the memory-lean allocation setting: it would stay on for every run after this one.
    base = load_model(model_path, torch.float32, quantization_bit=quantization_bit, unmap_freed_memory=False)
    model = load_adapter(base, str(adapter)).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]])
            labels = torch.tensor(sample["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int(labels.ne(-100).sum())
    del model, base
    release_freed_memory()
    return total / count


def first_batch_losses(model_path: str, samples, tokenizer) -> tuple[float, float]:
    """Loss of a fresh LoRA adapter on the same first batch: the stock full-logits way and the project's."""
    from transformers import DataCollatorForSeq2Seq

    from fora.args import FinetuningArguments, TrainArguments
    from fora.data.collator import PaddingCollator
    from fora.train.trainer import SupervisedTrainer

    model = load_model(model_path, torch.float32)
    torch.manual_seed(SEED)
    model = attach_adapter(model, FinetuningArguments(finetuning_type="lora", lora_rank=8))
    with torch.no_grad():  # give B a value so the adapter takes part in the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.eval()  # adapter dropout off: both computations see the same network
    features = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples.select(range(BATCH))]
    stock_batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=scratch, report_to="none"))
        with torch.no_grad():
            stock = model(**stock_batch).loss.item()
            project = trainer.compute_loss(model, PaddingCollator(tokenizer.pad_token_id)(features)).item()
    return stock, project


# ---------------------------------------------------------------------------------------------------
# Prediction: predict_fora.py vs one record at a time.


def run_predictions(adapter: Path, test_file: Path, output_dir: Path, count: int, new_tokens: int) -> dict:
    """predict_fora.py's runtime and texts at each of PREDICT_BATCHES, then one record at a time.

    Both in float32, whatever the adapter trained in: only then can greedy outputs be compared token
    for token. In bf16 a matmul's rounding depends on its batch shape (25 of 50 outputs differed)."""
    from fora.data.formats import load_conversations
    from fora.data.templates import get_template
    from fora.infer import generate
    from fora.infer import predict as predict_fora

    batched = {}
    for batch_size in PREDICT_BATCHES:
        with contextlib.redirect_stdout(sys.stderr):
            results = predict_fora.main([
                "--model_dir", str(adapter), "--test_path", str(test_file), "--output_dir", str(output_dir),
                "--overwrite_output_dir", "--max_new_tokens", str(new_tokens), "--batch_size", str(batch_size),
                "--torch_dtype", PREDICT_DTYPE,
                "--max_samples", str(count),
            ])
        lines = (output_dir / predict_fora.PREDICTIONS_FILE).read_text().splitlines()
        batched[batch_size] = (results["predict_runtime"], [json.loads(line)["predict"] for line in lines])

    model, tokenizer, info = load_inference_model(str(adapter), torch_dtype=PREDICT_DTYPE)
    template = get_template(tokenizer, info.get("template"))
    conversations = load_conversations(str(test_file), require_response=False)[0][:count]
    stop = template.stop_token_ids(tokenizer)
    config = generate.generation_config(tokenizer, stop)
    config.max_new_tokens = new_tokens
    prompts = [generate.build_prompt(tokenizer, template, c, SOURCE_LENGTH, TARGET_LENGTH)[0] for c in conversations]
    singles, started = [], time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            output = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
            output = output[: next((k for k, token in enumerate(output) if token in stop), len(output))]
            singles.append(generate.decode(tokenizer, output))
    return {
        "records": len(prompts),
        "single_runtime": time.perf_counter() - started,
        "batched": {size: (runtime, sum(a == b for a, b in zip(texts, singles))) for size, (runtime, texts) in batched.items()},
    }


# ---------------------------------------------------------------------------------------------------
# Scaling: the project's training step on rows of fixed length.


def fixed_length_rows(samples, length: int, count: int) -> list[dict]:
    """`count` rows of exactly `length` tokens cut from the concatenated samples (answer tokens stay supervised)."""
    ids, labels = [], []
    while len(ids) < length * count:
        for sample in samples:
            ids += sample["input_ids"]
            labels += sample["labels"]
    return [
        {"input_ids": ids[i * length : (i + 1) * length], "labels": labels[i * length : (i + 1) * length]}
        for i in range(count)
    ]


def scaling_rates(model_path: str, samples, tokenizer, setting: Setting) -> list[tuple[int, float]]:
    """Training tokens/s of the project's step (forward, supervised loss, backward, AdamW) per row length."""
    from fora.args import FinetuningArguments, TrainArguments
    from fora.data.collator import PaddingCollator
    from fora.train.trainer import SupervisedTrainer

    model = load_model(model_path, torch.float32)
    torch.manual_seed(SEED)
    model = attach_adapter(model, FinetuningArguments(finetuning_type="lora", lora_rank=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    collate = PaddingCollator(tokenizer.pad_token_id)
    rates = []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=scratch, report_to="none"))
        for length in setting.scaling_lengths:
            batch = collate(fixed_length_rows(samples, length, setting.scaling_tokens // length))
            times = []
            for step in range(setting.scaling_steps + 1):
                started = time.perf_counter()
                trainer.compute_loss(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:  # the first step warms up
                    times.append(time.perf_counter() - started)
            rates.append((length, setting.scaling_tokens / statistics.median(times)))
            print(f"  scaling: {length} tokens per row, {rates[-1][1]:.0f} tokens/s", file=sys.stderr)
    return rates


# ---------------------------------------------------------------------------------------------------
# The report.


@contextlib.contextmanager
def patched(owner, name: str, value):
    """`owner.name` is `value` inside the block: an optimisation with no flag, turned off for an ablation."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def recomputed_head_loss(hidden, weight, bias, targets, scale, softcap, with_grad):
    """The supervised head loss the plain autograd way: each chunk checkpointed, its logits recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    from fora.train.loss import LOSS_CHUNK

    def chunk_loss(chunk, chunk_targets):
        logits = F.linear(chunk, weight, bias).float() * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, chunk_targets, reduction="sum")

    chunks = range(0, hidden.shape[0], LOSS_CHUNK)
    return sum(checkpoint(chunk_loss, hidden[i : i + LOSS_CHUNK], targets[i : i + LOSS_CHUNK], use_reentrant=False) for i in chunks)


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def training_row(name: str, run: dict, useful_flops: float, peak: float, eval_loss: float | None) -> list:
    return [
        name, round(run["samples"] / run["runtime"], 3), round(run["real_tokens"] / run["runtime"]),
        f"{100 * run['pad_fraction']:.1f}%", round(run["peak_gb"], 2), round(run["train_loss"], 4),
        "-" if eval_loss is None else round(eval_loss, 4), f"{100 * useful_flops / run['runtime'] / 1e9 / peak:.1f}%",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few records per section: under 5 minutes")
    parser.add_argument("--records", type=int, help="training records (default 200, quick 16)")
    parser.add_argument("--sections", help=f"comma-separated, from {','.join(SECTIONS)} (default all; quick: no ablate)")
    parser.add_argument("--variants", help="comma-separated, from lora,fora,qlora (default all; quick: lora)")
    parser.add_argument("--work_dir", default=str(REPO / "output" / "bench"), help="adapters and caches go here")
    args = parser.parse_args()
    setting = QUICK if args.quick else Setting()
    if args.records:
        setting.records = args.records
    if args.variants:
        setting.variants = tuple(args.variants.split(","))
    sections = args.sections.split(",") if args.sections else (QUICK_SECTIONS if args.quick else SECTIONS)
    for needed in ("spo_0.json", "spo_1.json"):
        if not (SHARED_DATA / needed).is_file():
            sys.exit(f"error: {SHARED_DATA / needed} not found (the benchmark uses the FoRA authors' data in ../shared)")

    from transformers import AutoConfig

    from fora.data.templates import get_template

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_path = str(ensure_default_model())
    tokenizer = load_tokenizer(model_path)
    template = get_template(tokenizer, None)
    train_file = write_records(SHARED_DATA / "spo_0.json", setting.records, work / "train.json")
    eval_file = write_records(SHARED_DATA / "spo_1.json", setting.eval_records, work / "heldout.json")
    train_set = tokenize(train_file, tokenizer, template, work / "cache")
    heldout = tokenize(eval_file, tokenizer, template, work / "cache")
    shape = ModelShape.of(AutoConfig.from_pretrained(model_path))
    epoch_flops = sum(shape.useful_flops(len(s["input_ids"]), supervised_count(s)) for s in train_set)
    training_dtype = "bfloat16" if half_precision() else "float32"
    print(f"# FoRA speed benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads, torch {torch.__version__}, "
          f"training dtype {training_dtype}")
    print(f"# train: {len(train_set)} records of spo_0.json, cutoff {SOURCE_LENGTH + TARGET_LENGTH}, batch {BATCH}, 1 epoch; "
          f"eval: {len(heldout)} records of spo_1.json")

    peak = {"float32": peak_matmul_rate(torch.float32), "bfloat16": peak_matmul_rate(torch.bfloat16)}
    peak_rate = peak[training_dtype]
    print(f"\n## Peak matrix multiply: float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['bfloat16']:.0f} GFLOP/s "
          f"(MFU below is against {training_dtype})")

    if "parity" in sections:
        stock, project = first_batch_losses(model_path, train_set, tokenizer)
        print(f"\n## Loss on an identical first batch: stock {stock:.6f}, project {project:.6f}, "
              f"difference {abs(stock - project):.2e} (target <= 1e-3)")

    runs = {}
    if "train" in sections:
        header = ["recipe", "samples/s", "real tok/s", "pad", "peak GB", "train loss", "eval loss", "MFU"]
        rows, ratios = [], []
        for variant in setting.variants:
            bits = 4 if variant == "qlora" else None
            label = {"lora": "LoRA r8", "fora": "FoRA r2", "qlora": "QLoRA r8"}[variant]
            stock = run_stock(model_path, train_set, tokenizer, work / f"stock-{variant}", variant)
            stock_loss = heldout_loss(model_path, stock["adapter"], heldout, bits)
            rows.append(training_row(f"stock {label}", stock, epoch_flops, peak_rate, stock_loss))
            projects = {label: ()}
            if variant == "qlora":  # both sides of its memory/speed flag; the default last (its setting sticks)
                projects = {f"{label}, --unmap_freed_memory False": ("--unmap_freed_memory", "False"), f"{label} (default)": ()}
            for name, flags in projects.items():
                project = runs[variant] = run_project(train_file, work / f"project-{variant}", work / "cache", variant, *flags)
                loss = heldout_loss(model_path, project["adapter"], heldout, bits)
                rows.append(training_row(f"project {name}", project, epoch_flops, peak_rate, loss))
                speedup = (project["samples"] / project["runtime"]) / (stock["samples"] / stock["runtime"])
                ratios.append(f"{name}: samples/s ratio {speedup:.2f}x (target >= 2.5), "
                              f"eval loss {100 * (loss / stock_loss - 1):+.1f}% vs stock (target within 3%)")
            if variant == "qlora":
                # Back to the largest threshold glibc's default would reach, for the sections after this one.
                return_large_frees_to_system(32 << 20)
        print("\n## Training\n" + table(header, rows) + "\n" + "\n".join(ratios))

    if "ablate" in sections:
        header = ["project LoRA r8 with ...", "samples/s", "real tok/s", "pad", "peak GB", "train loss", "eval loss", "MFU"]
        base = runs.get("lora") or run_project(train_file, work / "project-lora", work / "cache", "lora")
        rows = [training_row("everything on", base, epoch_flops, peak_rate, None)]

        no_change = contextlib.nullcontext
        ablations = {
            "gradient checkpointing on": (("--gradient_checkpointing",), no_change()),
            "batches in random order": (("--group_by_length", "False"), no_change()),
            "full logits": (("--supervised_logits", "False"), no_change()),
            "adapter dropout 0.05 (the old default)": (("--lora_dropout", "0.05"), no_change()),
            "PEFT's LoRA layers (no addmm)": ((), patched(lora_fast, "use_addmm_layers", lambda config, **_: config)),
            "head loss by autograd, logits recomputed": ((), patched(HeadCrossEntropy, "apply", recomputed_head_loss)),
        }
        for name, (flags, change) in ablations.items():
            with change:
                run = run_project(train_file, work / "ablation", work / "cache", "lora", *flags)
            slower = (base["samples"] / base["runtime"]) / (run["samples"] / run["runtime"])
            rows.append(training_row(name, run, epoch_flops, peak_rate, None) + [f"{slower:.2f}x"])
        rows[0].append("1.00x")
        print("\n## What each optimisation contributes (turned off one at a time)\n" + table(header + ["slowdown"], rows))

    if "predict" in sections:
        adapter = work / "project-lora"
        if not (adapter / "adapter_config.json").is_file():
            run_project(train_file, adapter, work / "cache", "lora")
        result = run_predictions(adapter, SHARED_DATA / "spo_1.json", work / "predict", setting.predict_records, setting.new_tokens)
        records, single_runtime = result["records"], result["single_runtime"]
        rows = [[f"predict_fora.py --batch_size {size}", round(records / runtime, 3), round(runtime, 1),
                 f"{single_runtime / runtime:.2f}x", f"{identical} of {records}"]
                for size, (runtime, identical) in result["batched"].items()]
        rows.append(["one record at a time", round(records / single_runtime, 3), round(single_runtime, 1), "1.00x", ""])
        print(f"\n## Prediction: {records} records of spo_1.json, greedy, {setting.new_tokens} new tokens at most\n"
              + table(["path", "samples/s", "runtime s", "ratio", "identical outputs"], rows)
              + "\n(target: ratio >= 4.0 with identical outputs)")

    if "scaling" in sections:
        rates = scaling_rates(model_path, train_set, tokenizer, setting)
        base_length, base_rate = rates[0]
        rows = []
        for length, rate in rates:
            predicted = shape.useful_flops(length, 0) / length / (shape.useful_flops(base_length, 0) / base_length)
            rows.append([length, round(rate), round(base_rate / rate, 2), round(predicted, 2)])
        print(f"\n## Scaling: training on rows of fixed length, {setting.scaling_tokens} tokens per batch\n"
              + table(["row length", "tokens/s", "cost per token vs 256", "FLOPs per token vs 256"], rows))


if __name__ == "__main__":
    main()
