"""Resident memory of LoRA on a bf16 base vs QLoRA on a 4-bit NF4 base, each in a fresh process.

    python scripts/bench_qlora_memory.py [--cache_dir models/bench-llama-1.1b] [--variants bf16,nf4,nf4-stock]
                                         [--compute_dtype bfloat16] [--steps 2] [--tokens 128]

The base is a random-init Llama of 1.1B parameters with TinyLlama's shape (hidden 2048, intermediate
5632, 22 layers, 32 heads, 4 kv heads, vocab 32000), saved once as bf16 safetensors in --cache_dir.
Each variant runs in its own fresh subprocess: load, LoRA r8 on every linear layer of the blocks,
two AdamW steps on batch 1 x --tokens random tokens, then /proc/self/status is read.

Variants:
  bf16       LoRA on the bf16 base, loaded by the project (`load_model` + `attach_adapter`)
  nf4        QLoRA through the project's own loading path (`load_model(..., quantization_bit=4)` +
             `attach_adapter`), i.e. what train_qlora.py does
  nf4-stock  the textbook recipe for reference: from_pretrained(BitsAndBytesConfig nf4) +
             prepare_model_for_kbit_training + get_peft_model, nothing else
  nf4-mmap, nf4-upcast, nf4-notrim, nf4-heap
             nf4 with one of the loading path's memory measures left out (see ABLATIONS): loading
             through transformers' mmap (the fallback for remote code / .bin checkpoints, which then
             copies unquantized weights out of the map), PEFT's fp32 upcast of bf16 weights,
             gc + malloc_trim after loading, glibc's default (growing) mmap threshold

Columns: RssAnon and RssFile after the second step, resident = their sum, VmHWM = peak resident
over the whole process; the ratios are against the bf16 row. bf16 matmuls are emulated on CPUs
without AVX512-BF16/AMX and slow (tens of seconds per step at 1.1B): the bench needs only 2 steps.

Measured here (AMD EPYC, 2 cores, no native bf16; bitsandbytes 0.50.2, torch 2.13, transformers 5.23,
peft 0.21.2), GB after the second step:

    compute bf16   RssAnon RssFile resident VmHWM  res/bf16 peak/bf16
    bf16             1.43    2.22    3.65    3.82    1.00     1.00
    nf4              1.44    0.12    1.56    2.20    0.43     0.58
    nf4-stock        2.71    0.12    2.83    3.96    0.77     1.04
    nf4-mmap         1.44    0.12    1.56    3.53    0.43     0.92   (copy-out of the map; without it 1.17 + 2.22, VmHWM 4.04)
    nf4-upcast       1.60    0.12    1.72    2.45    0.47     0.64
    nf4-notrim       1.43    0.12    1.55    2.20    0.42     0.58
    nf4-heap         2.33    0.12    2.45    2.58    0.67     0.68
    compute fp32 (what train_qlora.py uses on this CPU): nf4 1.59 + 0.12 = 1.71 resident, VmHWM 2.45
"""

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fora.models.load import load_model
from fora.tuners.attach import attach_adapter, count_parameters, find_linear_targets

REPO = Path(__file__).resolve().parent.parent

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# nf4 with one of fora.modeling's memory measures switched off, to see what each one saves.
ABLATIONS = {  # variant: the modules that call the measure, its name there, and what replaces it
    "nf4-mmap": (("fora.models.load",), "_load_quantized_without_mmap", lambda *args: None),  # transformers' mmap loading
    "nf4-upcast": (("fora.tuners.attach",), "_held_out", lambda params: contextlib.nullcontext()),  # PEFT's fp32 copies
    "nf4-notrim": (("fora.models.load", "fora.tuners.attach"), "release_freed_memory", lambda: None),  # no gc + malloc_trim
    "nf4-heap": (("fora.models.load",), "return_large_frees_to_system", lambda *args: None),  # glibc's default threshold
}
FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS")


def proc_status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) * 1024
    return values


def build_model(folder: Path) -> None:
    """The random-init 1.1B Llama as one bf16 safetensors file (once; ~2.2 GB)."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"building the random 1.1B Llama in {folder} (once)", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, max_shard_size="10GB")
    partial.rename(folder)


def fast_bf16_matmul():
    """A dispatch mode that runs bf16 `A @ B` with a contiguous B as `A @ (B^T)^T` (a transient copy of B).

    Without native bf16 (AVX512-BF16/AMX), PyTorch's CPU kernel for that layout is ~50x slower than
    for `A @ B^T`, and it is the layout of every backward pass through a frozen linear layer (autograd's
    grad @ W, bitsandbytes' grad @ dequantize(W)): two steps of the bf16 runs would take an hour. The
    copy is one weight matrix at a time (at most 23 MB here), freed at once; results are the same.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    mm = torch.ops.aten.mm.default

    class FastBf16Matmul(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is mm and not kwargs:
                a, b = args
                if b.dtype == torch.bfloat16 and b.is_contiguous() and min(b.shape) > 1:
                    return func(a, b.t().contiguous().t())
            return func(*args, **(kwargs or {}))

    return FastBf16Matmul()


def child(variant: str, model_dir: str, compute_dtype: str, steps: int, tokens: int) -> dict:
    """One variant, in this (fresh) process; returns the measurements."""
    import torch

    from fora.args import FinetuningArguments
    from fora.precision import cpu_has_bf16

    torch.manual_seed(0)
    dtype = getattr(torch, compute_dtype)
    finetuning = FinetuningArguments(finetuning_type="lora", lora_rank=8)
    start = time.perf_counter()
    if variant == "bf16":
        model = load_model(model_dir, torch.bfloat16)
        model = attach_adapter(model, finetuning)
    elif variant == "nf4" or variant in ABLATIONS:
        if variant in ABLATIONS:  # leave one of the loading path's memory measures out
            modules, name, replacement = ABLATIONS[variant]
            for module in modules:
                setattr(importlib.import_module(module), name, replacement)
        model = load_model(model_dir, dtype, quantization_bit=4)
        model = attach_adapter(model, finetuning)
    elif variant == "nf4-stock":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, quantization_config=quantization, device_map={"": "cpu"}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=find_linear_targets(model))
        )
    else:
        raise SystemExit(f"unknown variant {variant}")
    loaded = proc_status()
    load_seconds = time.perf_counter() - start
    trainable, total = count_parameters(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1))
    step_seconds, losses, per_step = [], [], []
    bf16_compute = variant == "bf16" or compute_dtype == "bfloat16"
    shim = fast_bf16_matmul() if bf16_compute and not cpu_has_bf16() else contextlib.nullcontext()
    for _ in range(steps):
        t = time.perf_counter()
        with shim:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t)
        losses.append(loss.item())
        per_step.append(proc_status())
    after = proc_status()
    quantized = sum(
        p.numel() * p.element_size() for p in model.parameters() if type(p).__name__ == "Params4bit"
    )
    return {
        "variant": variant,
        "after_steps": after,
        "after_load": loaded,
        "per_step": per_step,
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "losses": losses,
        "trainable": trainable,
        "total": total,
        "quantized_weight_bytes": quantized,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "fast_bf16_matmul": not isinstance(shim, contextlib.nullcontext),
    }


def run_variant(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--cache_dir", str(args.cache_dir),
               "--compute_dtype", args.compute_dtype, "--steps", str(args.steps), "--tokens", str(args.tokens)]
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if process.returncode != 0:
        sys.stderr.write(process.stderr[-4000:])
        raise SystemExit(f"variant {variant} failed (exit {process.returncode})")
    return json.loads(process.stdout.strip().splitlines()[-1])


def gb(value: int) -> str:
    return f"{value / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", type=Path, default=REPO / "models" / "bench-llama-1.1b")
    parser.add_argument("--variants", default="bf16,nf4,nf4-stock",
                        help="comma-separated: bf16, nf4, nf4-stock, " + ", ".join(ABLATIONS))
    parser.add_argument("--compute_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="bnb_4bit_compute_dtype and dtype of the non-quantized weights of the 4-bit runs")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child(args.child, str(args.cache_dir), args.compute_dtype, args.steps, args.tokens)
        print(json.dumps(result))
        return

    build_model(args.cache_dir)
    results = []
    for variant in args.variants.split(","):
        print(f"running {variant} ...", flush=True)
        results.append(run_variant(variant, args))
    reference = next((r for r in results if r["variant"] == "bf16"), results[0])
    ref_resident = reference["after_steps"]["RssAnon"] + reference["after_steps"]["RssFile"]
    ref_peak = reference["after_steps"]["VmHWM"]
    print(f"\nbatch 1 x {args.tokens} tokens, LoRA r8 on all block linear layers, {args.steps} AdamW steps; "
          f"4-bit compute dtype {args.compute_dtype}; GB = 1e9 bytes, after the last step")
    header = (
        f"{'variant':<11} {'RssAnon':>8} {'RssFile':>8} {'resident':>9} {'VmHWM':>7} {'res/bf16':>9} "
        f"{'peak/bf16':>10} {'load s':>7} {'step s':>7} {'trainable':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        status = r["after_steps"]
        resident = status["RssAnon"] + status["RssFile"]
        print(f"{r['variant']:<11} {gb(status['RssAnon']):>8} {gb(status['RssFile']):>8} {gb(resident):>9} "
              f"{gb(status['VmHWM']):>7} {resident / ref_resident:>9.2f} {status['VmHWM'] / ref_peak:>10.2f} "
              f"{r['load_seconds']:>7.1f} {max(r['step_seconds']):>7.1f} {r['trainable']:>10,}")
    for r in results:
        if r["quantized_weight_bytes"]:
            print(f"{r['variant']}: quantized weights {gb(r['quantized_weight_bytes'])} GB; "
                  f"after load RssAnon {gb(r['after_load']['RssAnon'])} RssFile {gb(r['after_load']['RssFile'])}; "
                  f"param dtypes {', '.join(r['param_dtypes'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
