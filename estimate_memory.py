"""How much memory a training run needs per device, before it runs: the same flags (or argument file) as train_lora.py.

    python estimate_memory.py --train_file data/train.json --per_device_train_batch_size 4
    python estimate_memory.py --model_name_or_path baichuan2-13b-chat --lora_rank 8 --fp16 --device cuda --device_memory 24GB
    python estimate_memory.py args.yaml --json                      # one JSON object; total_bytes is the total

--model_name_or_path is a model folder (its config.json) or a name from the built-in table (fora/memory/architectures.py),
which works offline. Every input: `python estimate_memory.py --help`; what each line counts and how far it was from
measured runs: docs/memory.md.
"""

from fora.cli import estimate_memory

if __name__ == "__main__":
    estimate_memory()
