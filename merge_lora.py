"""Merge a LoRA or FoRA adapter into its base model and save a standalone model.

    python merge_lora.py --adapter output/demo --output_dir output/demo-merged
    python merge_lora.py --base_model DIR --adapter DIR --output_dir DIR [--max_shard_size 2GB]
                         [--dtype auto|float32|bfloat16|float16] [--merge_into dequantized|original]
                         [--overwrite_output_dir]

The result (sharded safetensors + index, config, tokenizer) loads with plain
`AutoModelForCausalLM.from_pretrained(DIR)`: no PEFT, no project code, no quantization config.
The merge is W + ΔW computed in float32 (LoRA: ΔW = s·BA; FoRA: ΔW = s·D(I+E+CB)A), then saved
in --dtype. --base_model defaults to the base recorded in the adapter's fora_run.json.

Adapters trained on a 4-bit (QLoRA) or 8-bit base, --merge_into:
  dequantized (default)  quantize the base exactly as training did, dequantize, and add ΔW in full
                         precision. These are the weights the adapter was trained against, so the
                         merged model reproduces base+adapter as trained (its outputs match the
                         quantized base + adapter up to float rounding). Use this to ship what you
                         trained and evaluated.
  original               add ΔW to the original 16/32-bit weights. The base is more faithful, but
                         the adapter learned to correct the quantized one, so outputs differ from
                         training-time behaviour by about the quantization error. Use it only when
                         you have checked that it scores at least as well on your validation data.
For adapters trained on a full-precision base the flag does not matter.

Nothing is written to --output_dir until the merged model is complete (it is written to a temporary
folder beside it and renamed into place); a folder that is not empty (a previous merge) is
replaced, as a whole, only with --overwrite_output_dir. A user's mistake prints one `error: ...` line and exits with code 2.
"""

from fora.cli import merge

if __name__ == "__main__":
    merge()
