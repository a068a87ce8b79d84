"""Merge a LoRA or FoRA adapter into its base and save a standalone model that plain transformers loads.

    base (fp32) ─┬─ [adapter trained on a 4/8-bit base, merge_into=dequantized]
                 │      quantize the base exactly as training did (models.load.load_model), dequantize each
                 │      quantized linear layer and put those weights into the fp32 base
                 └─ attach the adapter (tuners.attach.load_adapter) → merge_and_unload (W += ΔW in fp32;
                    FoRA: ΔW = s·D(I+E+CB)A via fusion_lora.ForaLinearVariant) → cast to --dtype
                    → save_pretrained (sharded safetensors) + the base's tokenizer files, byte for byte,
                    into a temporary folder
                    → rename into place

Nothing is written to --output_dir until the merged model is complete, and a failure leaves
whatever was there untouched.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from fora.errors import UserError
from fora.io import read_json, refuse_earlier_output, replace_dir
from fora.models import compat
from fora.models.inference import require_remote_code_flag
from fora.models.load import load_model, resolve_model_path
from fora.models.tokenizer import save_base_tokenizer
from fora.precision import merged_dtype
from fora.run import RUN_FILE, RunRecord
from fora.tuners.attach import load_adapter

MODEL_MARKERS = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "adapter_config.json")
MERGE_FILE = "fora_merge.json"  # where the merged model came from
PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")  # PEFT types that add no weight


def check_adapter_dir(adapter: str) -> Path:
    path = Path(adapter)
    if not path.exists():
        raise UserError(f"--adapter {adapter}: no such folder")
    if not path.is_dir():
        raise UserError(f"--adapter {adapter}: is a file, expected an adapter folder")
    if not (path / "adapter_config.json").is_file():
        hint = " (it is a full model; there is nothing to merge)" if (path / "config.json").is_file() else ""
        raise UserError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json){hint}")
    config = read_json(path / "adapter_config.json", "--adapter")
    if config.get("peft_type") in PROMPT_LEARNING:
        raise UserError(f"--adapter {adapter}: a {config['peft_type'].lower().replace('_', ' ')} adapter holds virtual tokens, "
                        "no weights to merge; predict_fora.py and the chat load the adapter as it is")
    if not any(path.glob("adapter_model.*")):
        raise UserError(f"--adapter {adapter}: the folder has no adapter weights (adapter_model.safetensors)")
    return path


def resolve_base(base_model: str | None, record: RunRecord | None, adapter: Path) -> str:
    """--base_model, else the base recorded in the adapter's run record, checked to be a model folder."""
    flag = "--base_model"
    if not base_model:
        if record is None:
            raise UserError(f"--base_model is required: {adapter} has no {RUN_FILE} naming the base model")
        base_model = record.base_model
        flag = f"--base_model (recorded in {adapter / RUN_FILE})"
    return resolve_model_path(base_model, flag)


def check_output_dir(output_dir: str, overwrite: bool, *inputs: Path) -> Path:
    out = Path(output_dir)
    for source in inputs:
        if source.exists() and (out.resolve() == source.resolve() or source.resolve() in out.resolve().parents):
            raise UserError(f"--output_dir {output_dir}: is (inside) the input folder {source}; choose another folder")
    refuse_earlier_output(out, (*MODEL_MARKERS, "*"), overwrite)  # the whole folder is replaced
    return out


def load_fp32_base(base: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    compat.prepare_remote_code(base, trust_remote_code, "--base_model")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UserError(f"--base_model {base}: cannot load the model ({str(error).splitlines()[0]})") from None
    if getattr(model.config, "quantization_config", None) is not None:
        raise UserError(f"--base_model {base}: is itself a quantized checkpoint; merge needs the 16/32-bit base")
    return model


def put_dequantized_weights(model: nn.Module, base: str, bits: int, dtype: torch.dtype, trust_remote_code: bool) -> int:
    """Replace the weights of the layers training saw quantized with their dequantized values, in place.

    The base is quantized by the very loading code training used (same BitsAndBytesConfig, same
    compute dtype), so the NF4 / int8 codes and scales are the ones the adapter was trained against.
    Returns the number of layers replaced.
    """
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    quantized = load_model(base, dtype, trust_remote_code, bits)
    targets = dict(model.named_modules())
    replaced = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        state = getattr(module, "state", None)
        weight = dequantize_bnb_weight(module.weight, state=state).to(torch.float32)
        target = targets.get(name)
        if target is None or getattr(target, "weight", None) is None or target.weight.shape != weight.shape:
            raise UserError(f"--base_model {base}: layer {name} differs between the full and the quantized load")
        with torch.no_grad():
            target.weight.copy_(weight)
        replaced += 1
    del quantized
    return replaced


def merge(args, log=print) -> Path:
    """Merge per `args` (fora.args.MergeArguments); returns the output folder."""
    adapter = check_adapter_dir(args.adapter)
    record = RunRecord.load(adapter)
    base = resolve_base(args.base_model, record, adapter)
    output_dir = check_output_dir(args.output_dir, args.overwrite_output_dir, adapter, Path(base))
    require_remote_code_flag(args.trust_remote_code, record, adapter, base)
    trust_remote_code = args.trust_remote_code
    bits = record.quantization_bit if record else None

    log(f"Base model: {base}")
    model = load_fp32_base(base, trust_remote_code)
    if bits and args.merge_into == "dequantized":
        dtype = getattr(torch, record.torch_dtype)  # the compute dtype the base was quantized with
        count = put_dequantized_weights(model, base, bits, dtype, trust_remote_code)
        log(f"The adapter was trained on a {bits}-bit base: merging into the dequantized {bits}-bit weights "
            f"({count} layers, quantized with compute dtype {str(dtype).removeprefix('torch.')} as in training)")
    elif bits:
        log(f"The adapter was trained on a {bits}-bit base: merging into the original weights (--merge_into original)")

    peft_model = load_adapter(model, str(adapter), flag="--adapter")
    config = peft_model.peft_config["default"]
    kind = "fora" if getattr(config, "use_fora", False) else record.finetuning_type if record else config.peft_type.value.lower()
    merged = peft_model.merge_and_unload(safe_merge=True)
    out_dtype = merged_dtype(args.dtype, base)
    merged = merged.to(out_dtype)
    merged.config.dtype = out_dtype
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.config.name_or_path = str(output_dir)
    log(f"Merged the {kind} adapter {adapter}; saving in {str(out_dtype).removeprefix('torch.')}")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        merged.save_pretrained(staging, max_shard_size=args.max_shard_size)
        save_base_tokenizer(base, staging, trust_remote_code)
        provenance = {
            "base_model": str(Path(base).resolve()) if Path(base).exists() else base,
            "adapter": str(adapter.resolve()),
            "finetuning_type": kind,
            "merge_into": args.merge_into if bits else "original",
            "quantization_bit": bits,
            "dtype": str(out_dtype).removeprefix("torch."),
        }
        (staging / MERGE_FILE).write_text(json.dumps(provenance, indent=2, ensure_ascii=False), encoding="utf-8")
        replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shards = sorted(p.name for p in output_dir.glob("*.safetensors"))
    log(f"Merged model saved to {output_dir} ({len(shards)} safetensors shard{'s' if len(shards) != 1 else ''})")
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    """merge_lora.py: parse the flags (fora.args.MergeArguments) and merge."""
    from fora.args import MergeArguments, parse_args

    (args,) = parse_args((MergeArguments,), argv)
    return merge(args)
