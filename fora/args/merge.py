"""Flags of merge_lora.py: fold a LoRA/FoRA adapter into its base and save a standalone model."""

from dataclasses import dataclass, field
from typing import Literal

from fora.precision import DtypeChoice


@dataclass
class MergeArguments:
    """Flags of merge_lora.py: fold a LoRA/FoRA adapter into its base and save a standalone model."""

    adapter: str = field(
        metadata={"help": "Adapter folder written by train_lora.py / train_qlora.py (adapter_config.json + weights)."}
    )
    output_dir: str = field(
        metadata={"help": "Folder for the merged model (safetensors shards + tokenizer), loadable by plain transformers."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model folder the adapter was trained on. Default: base_model in the adapter's fora_run.json."},
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "Largest safetensors shard, e.g. 2GB, 500MB; larger models get an index file."}
    )
    dtype: DtypeChoice = field(
        default="auto",
        metadata={
            "help": "dtype of the saved weights. The merge itself is done in "
            "float32. 'auto' = the dtype the base checkpoint is stored in (float32 if it does not say)."
        },
    )
    merge_into: Literal["dequantized", "original"] = field(
        default="dequantized",
        metadata={
            "help": "Only for adapters trained on a 4/8-bit base (quantization_bit in fora_run.json). dequantized "
            "(default): quantize the base as training did, dequantize, add the adapter in full precision - the "
            "weights the adapter was trained against, so the merged model behaves like base+adapter did in "
            "training. original: add it to the 16/32-bit base weights instead - a higher-fidelity base, but "
            "not the one the adapter learned to correct (a small mismatch of the size of the quantization error)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace --output_dir if it is not empty (a previous merge): the whole folder is swapped for "
            "the new one, only once that is complete. Without it a non-empty --output_dir is an error."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the base model's own Python code. Off by default, also when the adapter was trained with it."}
    )
