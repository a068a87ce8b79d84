"""What prediction and chat run: the model a folder holds (an adapter on its recorded base, a merged or fully
fine-tuned model, or the base itself), loaded as training left it, and a description of it for the log."""

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from fora.errors import UserError
from fora.io import read_json
from fora.models.load import load_model, resolve_model_path
from fora.models.tokenizer import load_tokenizer
from fora.precision import inference_dtype
from fora.run import RUN_FILE, RunRecord
from fora.tuners.attach import load_adapter


def require_remote_code_flag(trust_remote_code: bool, record: RunRecord | None, adapter_dir, base: str) -> None:
    """A recorded run never switches remote code on by itself: an adapter folder may come from anyone."""
    if record and record.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"{adapter_dir}: its base {base} was trained with --trust_remote_code ({RUN_FILE}); "
            "pass --trust_remote_code if you trust that folder's Python code"
        )


@contextlib.contextmanager
def _damaged_files_named(flag: str, folder: str):
    """A weights or JSON file that cannot be read (truncated, overwritten) is the user's to fix: one line."""
    from safetensors import SafetensorError

    try:
        yield
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as error:
        raise UserError(f"{flag} {folder}: a file in it cannot be read ({str(error).splitlines()[0]})") from None


def load_inference_model(
    model_dir: str | None = None,
    base_model: str | None = None,
    torch_dtype: str = "auto",
    trust_remote_code: bool = False,
    quantization_bit: int | None = None,
    merge: bool = True,
):
    """Model, left-padding tokenizer and what was loaded, for generation, from whatever `model_dir` holds.

    - an adapter folder (adapter_config.json; a checkpoint-N too): its base is `base_model`, else the
      one in its run record, loaded in the recorded dtype and quantization (remote code only with the
      flag). With `merge`, the adapter is merged into a float32 base for speed; in half precision it
      stays a separate product as in training, since a bf16/fp16 weight cannot hold W0 + dW without
      rounding much of a small dW away; on a quantized base it always stays separate;
    - a model folder (config.json + weights; merged or fully fine-tuned): loaded as it is;
    - None: the base model itself (`base_model`, else the embedded default).
    Without a record the dtype is float32, but on CUDA the one the checkpoint is stored in (precision.py);
    the model loads straight onto this process's device. Flags given here win over the recorded values.
    The tokenizer comes from the folder holding the weights (the base under an adapter), as training
    loaded it. The returned info is the run record as a dict (empty if none) plus model_kind (adapter,
    model, base), base_model, torch_dtype, quantization_bit and merged.
    """
    record, kind, adapter = None, "base", None
    if model_dir:
        path = Path(model_dir)
        if not path.is_dir():
            raise UserError(f"--model_dir {model_dir}: no such folder")
        record = RunRecord.load(path)
        if (path / "adapter_config.json").is_file():
            kind, adapter = "adapter", model_dir
        elif (path / "config.json").is_file():
            kind = "model"
        else:
            raise UserError(
                f"--model_dir {model_dir}: neither an adapter (adapter_config.json) nor a model folder (config.json)"
            )
    # The model to load, and the flag that named it (for error messages).
    model_source, model_flag = base_model, "--ori_model_dir"
    if kind == "adapter":
        recorded_base = (
            record.base_model if record else read_json(path / "adapter_config.json", "--model_dir").get("base_model_name_or_path")
        )
        model_source = base_model or recorded_base
        if not base_model and recorded_base and not Path(recorded_base).exists() and recorded_base.count("/") != 1:
            raise UserError(
                f"--model_dir {model_dir}: its base model {recorded_base} (recorded at training) is not here; "
                "pass --ori_model_dir BASE"
            )
    elif kind == "model":
        model_source, model_flag = model_dir, "--model_dir"
    model_path = resolve_model_path(model_source, model_flag)
    if quantization_bit is None and kind == "adapter" and record:
        quantization_bit = record.quantization_bit
    dtype_name = inference_dtype(torch_dtype, record.torch_dtype if record else None, model_path)
    require_remote_code_flag(trust_remote_code, record, model_dir, model_path)

    tokenizer = load_tokenizer(model_path, trust_remote_code, padding_side="left", flag=model_flag)
    with _damaged_files_named(model_flag, model_path):
        model = load_model(model_path, getattr(torch, dtype_name), trust_remote_code, quantization_bit, flag=model_flag,
                           on_device=True)
    merged = False
    if adapter:
        with _damaged_files_named("--model_dir", adapter):
            model = load_adapter(model, adapter, flag="--model_dir")
        mergeable = not model.active_peft_config.is_prompt_learning  # virtual tokens are no weights
        if merge and mergeable and not quantization_bit and dtype_name == "float32":
            model, merged = model.merge_and_unload(), True  # W + dW once: same outputs up to rounding, no adapter work per token
    model.eval()
    info = {
        **(asdict(record) if record else {}),
        "model_kind": kind,
        "base_model": model_path,
        "torch_dtype": dtype_name,
        "quantization_bit": quantization_bit,
        "merged": merged,
    }
    return model, tokenizer, info


def describe_loaded(model_dir: str | None, info: dict) -> str:
    """What `load_inference_model` loaded, in words, from the info it returned."""
    bits = f", {info['quantization_bit']}-bit" if info["quantization_bit"] else ""
    if info["model_kind"] == "adapter":
        kind = info.get("finetuning_type") or "PEFT"
        merged = "merged into the base" if info["merged"] else "kept separate from the base, as in training"
        what = f"{kind} adapter {model_dir} ({merged}) on {info['base_model']}{bits}"
    elif info["model_kind"] == "model":
        what = f"model {model_dir}{bits}"
    else:
        what = f"base model {info['base_model']}{bits}"
    return f"{what} ({info['torch_dtype']})"
