"""The run record: what training decided, saved beside every adapter and checkpoint, read by everything after.

`fora_run.json` is to this toolkit what `adapter_config.json` is to PEFT: training writes it
(atomically) into every `checkpoint-N` and into the final folder, and prediction, merging, chat and
federated rounds load it, so they need only the adapter folder to load the base as it was trained.

The rules that decide from it live here too:
- dtypes: `training_dtype` (what the base is loaded in for training), `inference_dtype` (prediction
  and chat), `merged_dtype` (what merge_lora.py saves); all go through `runnable_dtype`, the one
  place that knows half precision on a CPU;
- the tokenizer: `load_tokenizer`, always from the folder holding the model's weights (the base under
  an adapter), so training, prediction, merging and chat encode a prompt to the same ids.
"""

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from fora import compat
from fora.errors import UserError, read_json

RUN_FILE = "fora_run.json"
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = DtypeName.__args__
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Every file a tokenizer may be made of, remote-code tokenizers (tokenization_*.py, *.tiktoken) included.
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*",
    "*.model", "*.tiktoken", "tokenization_*.py",
)


@dataclass
class RunRecord:
    base_model: str  # the base's folder (absolute) or hub id
    finetuning_type: Literal["lora", "fora", "full"]
    torch_dtype: DtypeName  # what the base was loaded in (the compute dtype under a 4/8-bit base)
    quantization_bit: int | None = None
    trust_remote_code: bool = False  # recorded only: loading remote code again needs the user's flag
    template: str | None = None
    data_format: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    max_source_length: int | None = None
    max_target_length: int | None = None
    federated: dict | None = None  # train_federated.py: the round and the federation's settings

    @classmethod
    def of_training(cls, model_path: str, model_args, data_args, finetuning_args, template_name: str, **extra) -> "RunRecord":
        """The record of a training run from its parsed flags (config.py), the base it loaded and its template."""
        return cls(
            base_model=str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
            finetuning_type=finetuning_args.finetuning_type,
            torch_dtype=model_args.torch_dtype,
            quantization_bit=model_args.quantization_bit,
            trust_remote_code=model_args.trust_remote_code,
            template=template_name,
            data_format=data_args.data_format,
            prompt_column=data_args.prompt_column,
            response_column=data_args.response_column,
            max_source_length=data_args.max_source_length,
            max_target_length=data_args.max_target_length,
            **extra,
        )

    def save(self, folder: str | Path) -> None:
        """Write FOLDER/fora_run.json through a temporary file: a reader sees the old record or the new one."""
        path = Path(folder) / RUN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{RUN_FILE}.tmp{os.getpid()}")
        partial.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)

    @classmethod
    def load(cls, folder: str | Path) -> "RunRecord | None":
        """The record in FOLDER, or None if it has none.

        A `checkpoint-N` written before checkpoints carried their own record finds its run's one level up.
        """
        folder = Path(folder)
        path = folder / RUN_FILE
        if not path.is_file() and folder.name.startswith("checkpoint-"):
            path = folder.parent / RUN_FILE
        if not path.is_file():
            return None
        values = read_json(path)
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a JSON object (the run record)")
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("base_model", "finetuning_type") if not values.get(name)]
        if missing:
            raise UserError(f"{path}: field {missing[0]!r} is missing")
        values = {key: value for key, value in values.items() if key in known}
        values["torch_dtype"] = values.get("torch_dtype") if values.get("torch_dtype") in DTYPE_NAMES else "float32"
        return cls(**values)


# --- dtypes ---------------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16/AMX); emulated bf16 is far slower than fp32."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def native_half() -> DtypeName | None:
    """The half precision this machine computes in natively: bf16 (CUDA with bf16, or such a CPU), fp16 on
    older GPUs, none on CPUs without bf16."""
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bf16() else None


def runnable_dtype(name: DtypeName) -> DtypeName:
    """`name`, except half precision without CUDA: bf16 where the CPU has it natively, else float32."""
    if torch.cuda.is_available() or name == "float32":
        return name
    return "bfloat16" if cpu_has_bf16() else "float32"


def inference_dtype(requested: str, record: RunRecord | None) -> DtypeName:
    """Prediction's and chat's dtype: --torch_dtype, 'auto' = the recorded one, else float32."""
    name = requested if requested != "auto" else record.torch_dtype if record else "float32"
    return runnable_dtype(name)


def merged_dtype(requested: str, base: str) -> torch.dtype:
    """merge_lora.py --dtype; 'auto' = the dtype the base checkpoint is stored in (float32 when it does not say)."""
    if requested != "auto":
        return getattr(torch, requested)
    config_file = Path(base) / "config.json"
    stored = None
    if config_file.is_file():
        config = read_json(config_file)
        stored = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, stored) if stored in DTYPE_NAMES else torch.float32


def training_dtype(model_args, training_args) -> torch.dtype:
    """The dtype the base is loaded in for training, from --torch_dtype and --bf16/--fp16 (config.py).

    Without CUDA, TrainArguments has already replaced --fp16 (and --bf16 on CPUs without it); this
    adds --torch_dtype and warns once for all of them.
    """
    replaced = list(training_args.replaced_precision)
    requested = model_args.torch_dtype
    if requested != "auto" and runnable_dtype(requested) != requested:
        replaced.append(f"--torch_dtype {requested}")
        model_args.torch_dtype = runnable_dtype(requested)
    if replaced:
        print(f"warning: no CUDA here; {' and '.join(replaced)} -> {runnable_dtype('bfloat16')} on this CPU", file=sys.stderr)
    if training_args.chosen_precision:
        print(f"Precision: --{training_args.chosen_precision}, this machine's native half precision "
              "(no precision flag given; --torch_dtype float32 trains in full precision)")
    if model_args.torch_dtype == "auto":
        model_args.torch_dtype = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"
    return getattr(torch, model_args.torch_dtype)


# --- the tokenizer --------------------------------------------------------------------------------


def load_tokenizer(
    model_path: str, trust_remote_code: bool = False, padding_side: str = "right", flag: str = "--model_name_or_path"
):
    """The tokenizer of the model folder `model_path` (the base, under an adapter); `flag` names where the
    path came from, for the error message. A missing pad token becomes EOS (padding is masked anyway)."""
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


def save_base_tokenizer(base: str, destination: Path, trust_remote_code: bool) -> None:
    """The base's tokenizer files into `destination`, byte for byte: re-saving a tokenizer can change it
    (transformers 5 drops settings such as Baichuan2's add_bos_token: false), and an adapter or merged
    folder must encode as training did, also for someone loading it with plain transformers.
    A hub id's tokenizer (no local files to copy) is saved by transformers."""
    if not Path(base).is_dir():
        load_tokenizer(base, trust_remote_code, flag="--base_model").save_pretrained(destination)
        return
    for pattern in TOKENIZER_PATTERNS:
        for source in Path(base).glob(pattern):
            if source.is_file():
                shutil.copy2(source, Path(destination) / source.name)
