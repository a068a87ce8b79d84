"""The memory table of the checkpoints the model scripts name (and the other sizes of their families): estimate_memory.py
for the seed command's run (scripts/family.sh: batch 1, 512 + 512 tokens, 4 accumulation steps, the family's
--lora_config, --fp16, no gradient checkpointing) on a GPU, per device: LoRA, QLoRA (train_qlora.py: 4-bit base,
paged 8-bit AdamW on one GPU) and full fine-tuning, on one GPU and under DeepSpeed ZeRO-2 (ds_config.json) on 2, 4
and 8. These are estimates; docs/memory.md says how far they were from measured runs.

    python scripts/memory_table.py              # the whole table, printed (docs/memory.md holds it)
    python scripts/memory_table.py --readme     # README.md's model table: its "GiB per GPU" column, rewritten in place
"""

import argparse
import contextlib
import io
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--max_source_length", "512",
        "--max_target_length", "512", "--fp16", "--gradient_checkpointing", "false", "--device", "cuda", "--output_dir",
        str(REPO / "output" / "memory_table"), "--report_to", "none"]
METHODS = {"LoRA fp16": [], "QLoRA 4-bit": ["--qlora"], "full fp16": ["--finetuning_type", "full"]}
DEVICES = (1, 2, 4, 8)
# Sizes without a script of their own take their family's --lora_config.
FAMILY = {"llama-2-13b-chat": "llama-2-7b-chat", "llama-2-70b-chat": "llama-2-7b-chat", "qwen2.5-14b-instruct": "qwen2.5-7b-instruct",
          "internlm2-chat-20b": "internlm2-chat-7b", "pythia-12b": "pythia-1.4b"}
SMOLLM2_CONFIG = "lora_config_smollm2.json"


def lora_configs() -> dict[str, str]:
    """Each model script's NAME and its LORA_CONFIG."""
    found = {}
    for script in sorted((REPO / "scripts" / "models").glob("*.sh")):
        match = re.search(r"NAME=(\S+) .*LORA_CONFIG=(\S+)", script.read_text())
        found[match.group(1)] = match.group(2)
    return found


def estimate(flags: list[str]) -> float:
    """estimate_memory.py's total for `flags`, in GiB."""
    from fora.memory.report import main

    with contextlib.redirect_stdout(io.StringIO()):
        return main([*flags, "--json"])["total_bytes"] / 2**30


def rows(names: list[str], configs: dict[str, str], columns: list[tuple[str, int]]) -> list[list[str]]:
    table = []
    for name in names:
        config = configs.get(name) or configs.get(FAMILY.get(name, ""), SMOLLM2_CONFIG)
        base = ["--model_name_or_path", name, "--lora_config", str(REPO / "configs" / config), *SEED]
        cells = []
        for method, devices in columns:
            deepspeed = ["--deepspeed", str(REPO / "ds_config.json"), "--num_devices", str(devices)] if devices > 1 else []
            cells.append(f"{estimate([*base, *METHODS[method], *deepspeed]):.1f}")
        table.append([name, *cells])
    return table


README_COLUMN = "GiB per GPU: LoRA / QLoRA / full"


def update_readme(configs: dict[str, str]) -> None:
    """Rewrite the "GiB per GPU" column of README.md's model table (one row per scripts/models/NAME.sh), adding it if
    missing: LoRA, QLoRA and full fine-tuning on one GPU."""
    readme = REPO / "README.md"
    lines = readme.read_text(encoding="utf-8").split("\n")
    header = next(i for i, line in enumerate(lines) if line.startswith("| Model | script |"))
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    row = lambda values: "| " + " | ".join(values) + " |"  # noqa: E731
    names = cells(lines[header])
    column = names.index(README_COLUMN) if README_COLUMN in names else len(names)
    columns = [("LoRA fp16", 1), ("QLoRA 4-bit", 1), ("full fp16", 1)]
    for i in range(header, len(lines)):
        if not lines[i].startswith("|"):
            break
        values = cells(lines[i])
        if i == header:
            value = README_COLUMN
        elif i == header + 1:
            value = "---"
        else:
            name = re.fullmatch(r"`(\S+)\.sh`", values[1]).group(1)
            value = " / ".join(rows([name], configs, columns)[0][1:])
        values = values[:column] + [value] + values[column + 1:]
        lines[i] = "|" + "---|" * len(values) if i == header + 1 else row(values)
    readme.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's model table's memory column instead")
    args = parser.parse_args()
    from fora.memory.architectures import BUILT_IN

    configs = lora_configs()
    if args.readme:
        update_readme(configs)
        return
    columns = [(method, devices) for method in METHODS for devices in DEVICES]
    header = ["model", *(f"{method}, {'1 GPU' if devices == 1 else f'ZeRO-2 x {devices}'}" for method, devices in columns)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows(list(BUILT_IN), configs, columns):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
