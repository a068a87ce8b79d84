"""QLoRA: fine-tune LoRA or FoRA adapters on a base model loaded in 4-bit NF4 (or 8-bit) with bitsandbytes.

    python train_qlora.py --train_file data/train.json --output_dir output/qlora --lora_rank 8
    deepspeed --num_gpus 2 train_qlora.py ... --fp16 --deepspeed ds_config.json
    python train_qlora.py ... --quantization_bit 8          # LLM.int8 base instead of NF4
    python train_qlora.py ... --finetuning_type fora        # FoRA adapters on the 4-bit layers

The same script and flags as train_lora.py (see fora/args/ or `python train_qlora.py --help`); only
`--quantization_bit` defaults to 4 here. The base is quantized while it loads (NF4, double
quantization, compute dtype from --fp16/--bf16/--torch_dtype; without CUDA, fp16 becomes bf16 or
fp32 as in train_lora.py), prepared with PEFT's `prepare_model_for_kbit_training`, and the adapter
goes on every 4-bit linear layer of the Transformer blocks (fora/tuners/attach.py). The log states the
quantization in one line. On CUDA the optimizer defaults to paged AdamW (`--optim paged_adamw_8bit`,
whose states page out to CPU memory under pressure); on CPU, and whenever --optim is given, the
Trainer's choice stands. It runs under deepspeed (ZeRO-2) like train_lora.py, CPU included.
"""

from fora.cli import train_qlora

if __name__ == "__main__":
    train_qlora()
