"""The memory estimate against measured peaks: real training runs, each in a fresh process, and estimate_memory.py's
total for the same flags, case by case (docs/memory.md holds the table and the method).

    python scripts/memory_study.py                                  # every case (hours on 2 cores)
    python scripts/memory_study.py --models smollm2-135m --methods lora,full --lengths 512
    python scripts/memory_study.py --json study.json                # also keep every reading
    python scripts/memory_study.py --reestimate study.json          # the recorded measurements, estimated again

Models: the embedded SmolLM2-135M-Instruct and random-init Llamas of about 400M and 1.1B parameters built from
configs (bf16 safetensors, cached under --cache_dir, with SmolLM2's tokenizer). Every case trains 2 steps (the second
runs with the optimizer's states) on records long enough to be cut to exactly --max_source_length +
--max_target_length = LENGTH tokens; precision is the machine's default (fora.precision).

How the peak is read: on a CPU, VmHWM of the training process (/proc/self/status: the largest resident memory it had
over its whole life, loading, steps and the final save included), read when the run has returned; the estimate's
framework overhead is estimate_memory.py's own resident memory, a fresh process too. On CUDA, the training process's
torch.cuda.max_memory_allocated, against the estimate less its framework overhead (the CUDA context is not in it).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {  # None: the embedded model; else the random Llama's shape
    "smollm2-135m": None,
    "random-400m": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=4),
    "random-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4),
}
BATCH = {"smollm2-135m": 4, "random-400m": 2, "random-1.1b": 1}  # rows per step
METHODS = {"lora": [], "qlora": ["--quantization_bit", "4"], "fora": ["--finetuning_type", "fora"],
           "full": ["--finetuning_type", "full"]}
WORDS = "the pump leaks oil at the valve and the motor overheats after long hours of use in cold weather".split()


def build_random_model(name: str, folder: Path) -> Path:
    """A random-init Llama of MODELS[name]'s shape, SmolLM2's tokenizer, saved once in bf16."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fora.models.load import ensure_default_model

    print(f"building {name} in {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    config = LlamaConfig(**MODELS[name], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.fill_(1.0) if param_name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    model.to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def write_data(path: Path) -> Path:
    """Records long enough to be cut to any LENGTH up to 2048 (prompt and reply both)."""
    text = lambda i: " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1500))  # noqa: E731
    path.write_text("".join(json.dumps({"instruction": "Extract the triples.", "input": text(i), "output": text(i + 1)}) + "\n"
                            for i in range(32)), encoding="utf-8")
    return path


def case_flags(model_path: Path, data: Path, work: Path, name: str, batch: int, method: str, length: int, checkpointing: bool):
    return ["--model_name_or_path", str(model_path), "--train_file", str(data), "--output_dir", str(work / "runs" / name),
            "--overwrite_output_dir", "--cache_dir", str(work / "cache"), "--max_source_length", str(length // 2),
            "--max_target_length", str(length - length // 2), "--per_device_train_batch_size", str(batch), "--max_steps", "2",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--learning_rate", "1e-4",
            "--gradient_checkpointing", str(checkpointing).lower(), *METHODS[method]]


def measure_in_this_process(flags: list[str]) -> dict:
    """Train (fora.train.recipe, as train_lora.py does) and return the peak."""
    import torch

    from fora.memory.device import resident_memory
    from fora.train.recipe import main

    before = resident_memory()
    main(flags)
    if torch.cuda.is_available():
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "reading": "torch.cuda.max_memory_allocated"}
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"peak_bytes": int(status["VmHWM"].split()[0]) * 1024, "reading": "VmHWM", "resident_before_bytes": before}


def run_python(args: list[str], env: dict) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited {result.returncode}: {result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def measure(flags: list[str], env: dict) -> dict:
    return json.loads(run_python([__file__, "--child", json.dumps(flags)], env))


def estimate(flags: list[str], env: dict) -> dict:
    return json.loads(run_python(["estimate_memory.py", *flags, "--json"], env))


def compared(case: dict) -> tuple[int, float]:
    """(the estimate compared, its error against the measured peak): on CUDA without the framework overhead."""
    estimated = case["estimate"]["total_bytes"]
    if case["measured"]["reading"] != "VmHWM":
        estimated -= case["estimate"]["lines"]["framework overhead"]
    return estimated, estimated / case["measured"]["peak_bytes"] - 1


def markdown(cases: list[dict]) -> str:
    rows = ["| model | method | tokens | checkpointing | estimate GiB | measured GiB | error |",
            "|---|---|---|---|---|---|---|"]
    for case in cases:
        estimated, error = compared(case)
        checkpointing = "on" if case["checkpointing"] else "off"
        rows.append(f"| {case['model']} | {case['method']} | {case['batch']} x {case['length']} | {checkpointing} "
                    f"| {estimated / 2**30:.2f} | {case['measured']['peak_bytes'] / 2**30:.2f} | {100 * error:+.1f}% |")
    errors = [abs(compared(case)[1]) for case in cases]
    rows.append(f"\n{len(cases)} cases; largest error {100 * max(errors):.1f}%, mean absolute error {100 * sum(errors) / len(errors):.1f}%")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--lengths", default="512,1024", help="tokens per record, comma-separated")
    parser.add_argument("--checkpointing", default="false,true", help="gradient checkpointing: false, true or both")
    parser.add_argument("--cache_dir", type=Path, default=REPO / "models", help="where the random models are built once")
    parser.add_argument("--work_dir", type=Path, default=REPO / "output" / "memory_study")
    parser.add_argument("--json", type=Path, help="write every case's readings here (kept as cases finish; the cases "
                        "an existing file holds are kept and not measured again)")
    parser.add_argument("--reestimate", type=Path, help="a --json file: estimate its measured cases again, measure nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_in_this_process(json.loads(args.child))))
        return

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.reestimate:
        cases = json.loads(args.reestimate.read_text())
        for case in cases:
            case["estimate"] = estimate(case["flags"], env)
            case["error"] = compared(case)[1]
            print(f"{case['name']}: {100 * compared(case)[1]:+.1f}%", flush=True)
        args.reestimate.write_text(json.dumps(cases, indent=1))
        print(markdown(cases))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = write_data(args.work_dir / "long_records.jsonl")
    cases = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {case["name"] for case in cases}
    for model in args.models.split(","):
        from fora.models.load import ensure_default_model

        path = ensure_default_model() if MODELS[model] is None else build_random_model(model, args.cache_dir / f"study-{model}")
        for method in args.methods.split(","):
            for length in map(int, args.lengths.split(",")):
                for checkpointing in (value == "true" for value in args.checkpointing.split(",")):
                    name = f"{model}-{method}-{length}-{'ckpt' if checkpointing else 'nockpt'}"
                    if name in done:
                        continue
                    flags = case_flags(path, data, args.work_dir, name, BATCH[model], method, length, checkpointing)
                    case = {"name": name, "model": model, "method": method, "batch": BATCH[model], "length": length,
                            "checkpointing": checkpointing, "flags": flags}
                    case.update(measured=measure(flags, env), estimate=estimate(flags, env))
                    estimated, error = compared(case)
                    case["error"] = error
                    cases.append(case)
                    print(f"{name}: estimate {estimated / 2**30:.2f} GiB, measured {case['measured']['peak_bytes'] / 2**30:.2f} "
                          f"GiB ({100 * error:+.1f}%)", flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(cases, indent=1))
    print(markdown(cases))


if __name__ == "__main__":
    main()
