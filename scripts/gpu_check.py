"""The GPU path, checked end to end on a machine with CUDA (run through scripts/gpu_check.sh).

In order, each a row of the table printed at the end (status, seconds, peak GPU memory, what was seen):
  environment  CUDA and its device, hardware bf16 (not emulated), a bitsandbytes 4-bit matmul against the
               dequantized weight, DeepSpeed's accelerator, NCCL
  parity       under CUDA autocast (bf16, fp16) with gradient checkpointing: the supervised-position loss and
               its gradients against the model's own loss; the LoRA and FoRA fast layers against PEFT's plain
               forward
  train        15 steps each: train_lora.py at the default precision and with --fp16, full fine-tuning with
               --fp16, train_qlora.py with gradient checkpointing (peak memory from train_results.json)
  deepspeed    deepspeed --num_gpus 1 train_qlora.py --fp16, saved at step 5, resumed to step 15; the seed command
               under deepspeed with LoRA and with FoRA
  memory       the memory study's small cases (scripts/memory_study.py: every method, 4 x 256 tokens): the estimate
               against torch.cuda.max_memory_allocated, each within 20% (docs/memory.md)
  torchrun     torchrun --nproc_per_node 1 train_lora.py
  predict      the bf16 and 4-bit adapters with the automatic batch, an out-of-memory forced on batches over 4
               (the batch halves, the run completes); in float32, greedy at batch 1 equals the automatic batch
  merge        the QLoRA adapter merged, the merged folder scored
  chat         one terminal chat turn (cli_demo.py)
Work files go to OUT (a temporary folder by default, removed at the end).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
STEPS = ["--max_steps", "15", "--per_device_train_batch_size", "4", "--max_source_length", "256", "--max_target_length",
         "128", "--logging_steps", "5", "--report_to", "none", "--overwrite_output_dir"]
rows: list[list[str]] = []


def step(name: str):
    """Run the decorated check now as a row of the table: ok, or FAIL with the error's last line."""

    def run(check):
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            note, peak = check(), torch.cuda.max_memory_allocated()
            status = "ok"
        except Exception as error:  # every failure is a row, and the exit code
            traceback.print_exc()
            note, peak, status = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:120]}", 0, "FAIL"
        rows.append([name, status, f"{time.perf_counter() - started:.0f}", f"{peak / 2**30:.2f}" if peak else "", note or ""])
        print(f"[{status}] {name}: {note}", flush=True)

    return run


def command(*args: str, stdin: str | None = None) -> str:
    """Run a command line as a user would; its output, or an error with its last lines."""
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, input=stdin, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... exited {result.returncode}: {(result.stderr or result.stdout)[-2000:]}")
    return result.stdout


def trained(folder: Path) -> str:
    results = json.loads((folder / "train_results.json").read_text())
    peak = results.get("peak_device_memory_bytes") or 0
    return f"loss {results['final_loss']:.3f}, step {results['global_step']}, peak {peak / 2**30:.2f} GB"


def randomize_adapter(model) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.02)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device here: scripts/gpu_check.py checks the CUDA path")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fora-gpu-check-"))
    data = work / "train.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    data.write_text("".join((REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines(True)[:80]), encoding="utf-8")
    python = sys.executable

    from fora.models.load import ensure_default_model

    model_path = str(ensure_default_model())

    @step("environment")
    def environment():
        import bitsandbytes as bnb
        import deepspeed
        from peft.utils.integrations import dequantize_bnb_weight

        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float16, quant_type="nf4").cuda()
        x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
        expected = torch.nn.functional.linear(x, dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state).half())
        error = relative_error(layer(x), expected)
        assert error < 1e-2, f"4-bit matmul off by {error:.1e}"
        accelerator = deepspeed.get_accelerator().device_name()
        assert accelerator == "cuda" and torch.distributed.is_nccl_available(), f"DeepSpeed on {accelerator}"
        return f"{torch.cuda.get_device_name()}, bf16 {'native' if bf16 else 'not native (fp16 is chosen)'}, 4-bit error {error:.1e}"

    @step("parity")
    def parity():
        from peft import LoraConfig, get_peft_model

        from fora.args import FinetuningArguments, TrainArguments
        from fora.data.collator import PaddingCollator
        from fora.data.encode import tokenize_conversation
        from fora.data.formats import load_conversations
        from fora.data.templates import get_template
        from fora.models.load import load_model
        from fora.models.tokenizer import load_tokenizer
        from fora.train.trainer import SupervisedTrainer
        from fora.tuners.attach import attach_adapter

        tokenizer = load_tokenizer(model_path)
        template = get_template(tokenizer, None)
        conversations, _ = load_conversations(str(data))
        features = [tokenize_conversation({"where": c.where, "system": c.system, "turns": c.turns}, tokenizer, template, 256, 128)
                    for c in conversations[:4]]
        batch = {k: v.cuda() for k, v in PaddingCollator(tokenizer.pad_token_id)(features).items()}
        worst = {}
        for dtype in ([torch.bfloat16] if torch.cuda.is_bf16_supported(including_emulation=False) else []) + [torch.float16]:
            for method in ("lora", "fora"):
                torch.manual_seed(0)
                adapter = FinetuningArguments(finetuning_type=method, lora_rank=8)
                model = attach_adapter(load_model(model_path, torch.float32).cuda(), adapter, gradient_checkpointing=True)
                model.gradient_checkpointing_enable({"use_reentrant": False})
                model.train()
                randomize_adapter(model)  # factors that start at zero would leave half the gradients zero
                trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(work / "parity"), report_to="none"))
                with torch.autocast("cuda", dtype=dtype):
                    ours = trainer.compute_loss(model, batch, num_items_in_batch=None)
                ours.backward()
                ours_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
                model.zero_grad()
                with torch.autocast("cuda", dtype=dtype):
                    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
                own.backward()
                own_grads = [p.grad for p in model.parameters() if p.requires_grad]
                worst[f"{method} {str(dtype)[6:]} loss"] = relative_error(ours, own)
                worst[f"{method} {str(dtype)[6:]} grad"] = max(relative_error(a, b) for a, b in zip(ours_grads, own_grads))
            # the fast LoRA layer against PEFT's plain one, same weights
            torch.manual_seed(0)
            fast = attach_adapter(load_model(model_path, torch.float32).cuda(), FinetuningArguments(lora_rank=8))
            randomize_adapter(fast)
            plain = get_peft_model(load_model(model_path, torch.float32).cuda(),
                                   LoraConfig(r=8, lora_alpha=16, target_modules=fast.peft_config["default"].target_modules))
            plain.load_state_dict(fast.state_dict())
            with torch.autocast("cuda", dtype=dtype):
                a, b = fast(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits
            worst[f"addmm {str(dtype)[6:]} logits"] = relative_error(a, b)
        bad = {name: error for name, error in worst.items() if error > 2e-2}
        assert not bad, f"off: {bad}"
        return "worst relative error " + f"{max(worst.values()):.1e}"

    adapters = {}

    @step("train lora (default precision)")
    def train_default():
        adapters["bf16"] = work / "lora"
        command(python, "train_lora.py", "--train_file", str(data), "--output_dir", str(adapters["bf16"]), *STEPS)
        return trained(adapters["bf16"])

    @step("train lora --fp16")
    def train_fp16():
        command(python, "train_lora.py", "--train_file", str(data), "--output_dir", str(work / "lora-fp16"), "--fp16", *STEPS)
        return trained(work / "lora-fp16")

    @step("train full --fp16")
    def train_full():
        command(python, "train_lora.py", "--train_file", str(data), "--output_dir", str(work / "full-fp16"), "--fp16",
                "--finetuning_type", "full", "--save_strategy", "no", *STEPS)
        return trained(work / "full-fp16")

    @step("train_qlora --gradient_checkpointing")
    def train_qlora():
        adapters["4bit"] = work / "qlora"
        command(python, "train_qlora.py", "--train_file", str(data), "--output_dir", str(adapters["4bit"]), "--gradient_checkpointing",
                *STEPS)
        return trained(adapters["4bit"])

    @step("deepspeed qlora fp16, resumed")
    def deepspeed_resume():
        out = work / "ds-qlora"
        flags = ["deepspeed", "--num_gpus", "1", "train_qlora.py", "--train_file", str(data), "--output_dir", str(out),
                 "--fp16", "--deepspeed", "ds_config.json", "--save_steps", "5", *STEPS]
        command(*flags[:-len(STEPS)], *[v if v != "15" else "5" for v in STEPS])
        command(*flags, "--resume_from_checkpoint", "auto")
        return trained(out)

    @step("deepspeed lora and fora, seed command")
    def deepspeed_methods():
        notes = []
        for method in ("lora", "fora"):
            out = work / f"ds-{method}"
            command("deepspeed", "--num_gpus", "1", "train_lora.py", "--train_file", str(data), "--output_dir", str(out),
                    "--fp16", "--deepspeed", "ds_config.json", "--finetuning_type", method, "--save_strategy", "no", *STEPS)
            notes.append(f"{method}: {trained(out)}")
        return "; ".join(notes)

    @step("memory study, estimate vs measured")
    def memory_study():
        study = work / "memory_study.json"
        command(python, "scripts/memory_study.py", "--models", "smollm2-135m", "--lengths", "256", "--checkpointing", "false",
                "--work_dir", str(work / "memory_study"), "--json", str(study))
        errors = {case["name"]: case["error"] for case in json.loads(study.read_text())}
        worst = max(errors, key=lambda name: abs(errors[name]))
        assert all(abs(error) <= 0.20 for error in errors.values()), f"off by more than 20%: {errors}"
        return f"{len(errors)} cases, worst {worst} {100 * errors[worst]:+.1f}%"

    @step("torchrun lora")
    def torchrun():
        command("torchrun", "--nproc_per_node", "1", "train_lora.py", "--train_file", str(data), "--output_dir",
                str(work / "torchrun"), *STEPS)
        return trained(work / "torchrun")

    @step("predict, automatic batch")
    def predict():
        from transformers import GenerationMixin

        from fora.infer.predict import main as predict_main

        real_generate, halved = GenerationMixin.generate, []

        def small_memory(self, *args, **kwargs):
            rows_asked = kwargs["input_ids"].shape[0]
            if rows_asked > 4:
                halved.append(rows_asked)
                raise torch.OutOfMemoryError("CUDA out of memory (forced by gpu_check.py)")
            return real_generate(self, *args, **kwargs)

        notes = []
        flags = ["--test_path", "data/test.json", "--max_new_tokens", "32", "--overwrite_output_dir"]
        GenerationMixin.generate = small_memory
        try:
            for kind, adapter in adapters.items():
                results = predict_main(["--model_dir", str(adapter), "--output_dir", str(work / f"predict-{kind}"), *flags])
                assert results["generation"]["batch_size"] == 4 and halved, f"{kind}: the batch did not halve"
                notes.append(f"{kind} ROUGE-L {results['rouge-l']:.1f}")
        finally:
            GenerationMixin.generate = real_generate
        read = lambda name: (work / name / "generated_predictions.jsonl").read_text()  # noqa: E731
        fp32 = ["--model_dir", str(adapters["bf16"]), "--torch_dtype", "float32", *flags]
        predict_main([*fp32, "--output_dir", str(work / "fp32-auto")])
        predict_main([*fp32, "--output_dir", str(work / "fp32-one"), "--batch_size", "1"])
        assert read("fp32-auto") == read("fp32-one"), "float32 greedy differs between batch 1 and the automatic batch"
        return ", ".join(notes) + "; float32 batch 1 = automatic batch"

    @step("merge qlora, score the merged model")
    def merge():
        command(python, "merge_lora.py", "--adapter", str(adapters["4bit"]), "--output_dir", str(work / "merged"), "--overwrite_output_dir")
        command(python, "predict_fora.py", "--model_dir", str(work / "merged"), "--test_path", "data/test.json", "--output_dir",
                str(work / "predict-merged"), "--max_new_tokens", "32", "--overwrite_output_dir")
        return f"ROUGE-L {json.loads((work / 'predict-merged' / 'predict_results.json').read_text())['rouge-l']:.1f}"

    @step("chat, one terminal turn")
    def chat():
        output = command(python, "cli_demo.py", "--model_dir", str(adapters["bf16"]), "--max_new_tokens", "16", stdin="你好\nexit\n")
        assert "Assistant:" in output, output[-500:]
        return "replied"

    width = [max(len(row[i]) for row in [["step", "result", "s", "peak GB", "seen"], *rows]) for i in range(5)]
    for row in [["step", "result", "s", "peak GB", "seen"], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip())
    if not args.out:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if any(row[1] != "ok" for row in rows) else 0)


if __name__ == "__main__":
    main()
