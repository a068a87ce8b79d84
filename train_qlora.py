"""QLoRA: fine-tune LoRA or FoRA adapters on a base model loaded in 4-bit NF4 (or 8-bit) with bitsandbytes.

    python train_qlora.py --train_file data/train.json --output_dir output/qlora --lora_rank 8
    deepspeed --num_gpus 2 train_qlora.py ... --fp16 --deepspeed ds_config.json
    python train_qlora.py ... --quantization_bit 8          # LLM.int8 base instead of NF4
    python train_qlora.py ... --finetuning_type fora        # FoRA adapters on the 4-bit layers

The same script and flags as train_lora.py (see config.py or `python train_qlora.py --help`); only
`--quantization_bit` defaults to 4 here. The base is quantized while it loads (NF4, double
quantization, compute dtype from --fp16/--bf16/--torch_dtype; without CUDA, fp16 becomes bf16 or
fp32 as in train_lora.py), prepared with PEFT's `prepare_model_for_kbit_training`, and the adapter
goes on every 4-bit linear layer of the Transformer blocks (fora/modeling.py). The log states the
quantization in one line. On CUDA the optimizer defaults to paged AdamW (`--optim paged_adamw_8bit`,
whose states page out to CPU memory under pressure); on CPU, and whenever --optim is given, the
Trainer's choice stands. It runs under deepspeed (ZeRO-2) like train_lora.py, CPU included.
"""

import sys

from train_lora import run

PAGED_OPTIMIZER = "paged_adamw_8bit"


def with_paged_optimizer(argv: list[str], cuda: bool) -> list[str]:
    """`argv` plus `--optim paged_adamw_8bit` on CUDA unless the flags or the argument file choose an optimizer."""
    if not cuda or any(arg == "--optim" or arg.startswith("--optim=") for arg in argv):
        return argv
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        from config import _file_as_flags
        from fora.errors import UserError

        try:
            if "--optim" in _file_as_flags(argv[0]):
                return argv
        except UserError:
            return argv  # the argument file is broken; parse_args reports it
    return [*argv, "--optim", PAGED_OPTIMIZER]


if __name__ == "__main__":
    import torch

    sys.argv[1:] = with_paged_optimizer(sys.argv[1:], torch.cuda.is_available())
    run(default_quantization_bit=4)
