"""Every command-line argument of the training scripts, with its documentation as `help` text.

`train_lora.py` and `train_qlora.py` parse these dataclasses with `HfArgumentParser`; `python
train_lora.py --help` prints this reference. A single `.json` or `.yaml` file given instead of
flags is read as the whole argument set (flags after it override the file).

The seeds' command lines predate transformers 5, which dropped `warmup_ratio`,
`overwrite_output_dir`, `group_by_length` and `logging_dir` from `TrainingArguments`; they are
kept here with their old meaning and mapped onto what transformers 5 offers.
"""

import fora  # noqa: F401, I001  first: it quiets bitsandbytes, which transformers imports (see fora/__init__.py)
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, TrainingArguments

from fora import run
from fora.errors import UserError, read_json
from fora.templates import check_template_name

DTYPES = ("auto", "float32", "bfloat16", "float16")
FINETUNING_TYPES = ("lora", "fora", "full")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model: a local folder with config.json and weights (any AutoModelForCausalLM). "
            "Default: the embedded SmolLM2-135M-Instruct, converted once to models/SmolLM2-135M-Instruct."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": f"dtype the base weights are loaded in, one of {', '.join(DTYPES)}. 'auto' = the dtype "
            "--bf16/--fp16 train in; with neither flag, the machine's native half precision (--bf16 on CUDA with "
            "bf16 and on CPUs with native bf16, --fp16 on older GPUs), else float32. --torch_dtype float32 trains "
            "in full precision. Without CUDA, float16 becomes bfloat16 (float32 on CPUs without native bf16), "
            "with one warning."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model's own Python code from its folder (Baichuan, ChatGLM need it). Off by default."},
    )
    quantization_bit: int | None = field(
        default=None,
        metadata={
            "help": "Load the base in 4-bit NF4 (4) or 8-bit (8) with bitsandbytes, for QLoRA. "
            "train_qlora.py defaults to 4."
        },
    )
    unmap_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "With a 4/8-bit base on CPU: have glibc unmap every freed block of 1 MB or more instead of "
            "keeping it in its heap. Peak memory stays lower (SmolLM2-135M at 4 x 545 tokens: 3.5 GB against 6.0 GB; "
            "1.1B at batch 1 x 128: 2.2 GB against 3.1-3.3 GB, which otherwise grows step by step), but every new "
            "activation is page-faulted in again: on the 2-core test machine one step of the former shape is 1.6x "
            "slower, the benchmark's epoch of 200 records 1.02-1.15x. --unmap_freed_memory False trades the memory for the speed. "
            "No effect on GPU or with an unquantized base."
        },
    )

    def __post_init__(self):
        # Checked here, before the data is tokenized and the model loaded, where they are first used.
        if self.torch_dtype not in DTYPES:
            raise UserError(f"--torch_dtype {self.torch_dtype!r} is unknown; choose one of: {', '.join(DTYPES)}")
        if self.quantization_bit not in (None, 4, 8):
            raise UserError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Training data, a JSON array or JSON Lines file (any suffix)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out data in the same format; eval loss is reported every --eval_steps."}
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with a dataset_info.json registry (LLaMA-Factory style), used with --dataset."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Name of a dataset in DATASET_DIR/dataset_info.json; its file and columns are used."},
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "auto (detect from the records), alpaca (instruction/input/output), promptcblue "
            "(input/target), columns (--prompt_column/--response_column), xtuner (conversation), "
            "sharegpt (conversations)."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={"help": "Field holding the user's text (alpaca: input, promptcblue: input). Must exist in the data."},
    )
    response_column: str | None = field(
        default=None,
        metadata={"help": "Field holding the answer to learn (alpaca: output, promptcblue: target)."},
    )
    empty_response: str = field(
        default="train",
        metadata={
            "help": "A record whose response is empty text: train (learn to answer with EOS alone, e.g. "
            "nothing to extract), skip (leave it out), or error (stop). The log counts them; with train, a file "
            "in which more than half the responses are empty (a test split, say) stops the run."
        },
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt format: a name from fora/templates.py (default, alpaca, vicuna, chatml, qwen, llama2, "
            "llama3, baichuan, baichuan2, chatglm2, chatglm3, internlm2, empty) or chat_template. Unset or auto: "
            "the model family's own format where config.json and the tokenizer tell it (Baichuan/Baichuan2 chat, "
            "ChatGLM2/3, InternLM2), else the tokenizer's chat template if it has one, else default "
            "('Human: ...\\n\\nAssistant: ')."
        },
    )
    max_source_length: int = field(
        default=512,
        metadata={
            "help": "Prompt tokens kept per turn, template included. A longer prompt loses the END of the user's "
            "text (its start, where the instruction is, stays); the template's system text, role headers and "
            "special tokens are never cut (a limit they alone exceed is an error)."
        },
    )
    max_target_length: int = field(
        default=512, metadata={"help": "Response tokens kept per turn, EOS included; longer responses are cut."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for the tokenized-data cache. Default: .fora_cache next to the data file."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again even if a cache exists."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the data (default: one)."}
    )

    def __post_init__(self):
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.data_format not in ("auto", "alpaca", "promptcblue", "columns", "xtuner", "sharegpt"):
            raise UserError(f"--data_format {self.data_format!r} is unknown")
        if self.empty_response not in ("train", "skip", "error"):
            raise UserError(f"--empty_response {self.empty_response!r} is unknown; choose train, skip or error")
        check_template_name(self.template)
        if self.dataset:
            self._resolve_dataset()

    def _resolve_dataset(self):
        """Turn --dataset_dir + --dataset into a file path and column names."""
        path, query, response = registered_dataset(self.dataset_dir, self.dataset)
        self.train_file = self.train_file or path
        self.prompt_column = self.prompt_column or query
        self.response_column = self.response_column or response


@dataclass
class FinetuningArguments:
    finetuning_type: str = field(
        default="lora", metadata={"help": "lora, fora (Fusion of low-Rank Adaptation, fusion_lora.py) or full."}
    )
    use_lora: bool = field(
        default=True, metadata={"help": "False = full fine-tuning of every weight (same as --finetuning_type full)."}
    )
    lora_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON file with {lora_r, lora_alpha, lora_dropout, lora_target_modules, modules_to_save}; "
            "flags given on the command line win over it. See configs/."
        },
    )
    lora_rank: int | None = field(default=None, metadata={"help": "Adapter rank r (default 8)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "Scaling numerator: s = alpha / r (default 2 r)."})
    lora_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout on the adapter input (default 0, as in PEFT and LLaMA-Factory: on CPU its random "
            "masks cost ~15%% of a step)."
        },
    )
    lora_target: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated names of the linear layers to adapt (e.g. q_proj,v_proj). Default: every "
            "linear layer inside the Transformer blocks, found by walking the model (not the output head)."
        },
    )
    modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma-separated modules trained in full and saved with the adapter."}
    )
    fora_mid_ratio: float = field(
        default=0.25, metadata={"help": "FoRA mid width m = max(2, floor(mid_ratio * d_in))."}
    )

    def __post_init__(self):
        if not self.use_lora:
            self.finetuning_type = "full"
        if self.finetuning_type not in FINETUNING_TYPES:
            raise UserError(f"--finetuning_type {self.finetuning_type!r} is unknown; choose one of: lora, fora, full")
        file_values = self._read_lora_config() if self.lora_config else {}
        defaults = {
            "lora_rank": file_values.get("lora_r", 8),
            "lora_dropout": file_values.get("lora_dropout", 0.0),
            "lora_target": _as_csv(file_values.get("lora_target_modules")),
            "modules_to_save": _as_csv(file_values.get("modules_to_save")),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lora_alpha is None:
            self.lora_alpha = file_values.get("lora_alpha", 2 * self.lora_rank)
        if self.lora_rank < 1:
            raise UserError(f"--lora_rank must be at least 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.fora_mid_ratio <= 1:
            raise UserError(f"--fora_mid_ratio must be in (0, 1], got {self.fora_mid_ratio}")

    def _read_lora_config(self) -> dict:
        path = Path(self.lora_config)
        values = read_json(path, "--lora_config")
        if not isinstance(values, dict):
            raise UserError(f"--lora_config {path}: expected a JSON object of lora_r, lora_alpha, ...")
        known = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save"}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"--lora_config {path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return values


@dataclass
class TrainArguments(TrainingArguments):
    """HF `TrainingArguments` plus the seeds' flags that transformers 5 removed."""

    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of the total steps spent warming up the learning rate."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow --output_dir to hold a previous run; without it such a run is kept."}
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch records of similar length together (shuffled groups) so little is padding."},
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard log folder (default OUTPUT_DIR/runs)."}
    )
    supervised_logits: bool = field(
        default=True,
        metadata={
            "help": "Apply the output layer and loss only at positions whose label is trained (same loss, "
            "less work), on the architectures where a test proves it equal to the model's own loss; others get "
            "full logits and the log says so. False: logits over the whole vocabulary at every position, as plain "
            "transformers does."
        },
    )
    trust_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint even if its pickled files (optimizer, DeepSpeed states) hold objects "
            "beyond tensors, plain data and the few classes honest checkpoints need. Unpickling such a file can run "
            "code: pass it only for a checkpoint you wrote yourself."
        },
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Where metrics go: tensorboard (default), none, or other HF integrations."}
    )

    def __post_init__(self):
        if self.learning_rate < 0:
            raise UserError(f"--learning_rate must not be negative, got {self.learning_rate}")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a float < 1 as a ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        self.logging_dir = self.logging_dir or os.path.join(self.output_dir or "trainer_output", "runs")
        os.environ["TENSORBOARD_LOGGING_DIR"] = self.logging_dir
        if isinstance(self.deepspeed, str) and not self.deepspeed.startswith("{"):
            read_json(self.deepspeed, "--deepspeed")
        # Before the parent fills the DeepSpeed config's "auto" precision from fp16/bf16.
        self.replaced_precision = []  # reported, together with --torch_dtype, by run.training_dtype
        self.chosen_precision = None  # "bf16"/"fp16" when parse_args chose it (no precision flag given)
        if not torch.cuda.is_available():
            # accelerate forms a multi-process group (gloo) on CPU only when told it runs on CPU.
            self.use_cpu = True
            if self.fp16 or (self.bf16 and not run.cpu_has_bf16()):
                self.replaced_precision.append("--fp16" if self.fp16 else "--bf16")
                self.fp16, self.bf16 = False, run.cpu_has_bf16()
        super().__post_init__()


def _as_csv(value) -> str | None:
    return ",".join(value) if isinstance(value, list) else value


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse flags, or a single .json/.yaml file of them (later flags override the file).

    A training run that names no precision (no --bf16, --fp16 or --torch_dtype) gets the machine's
    native half precision (`default_half_precision`), as if its flag had been given.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        argv = _file_as_flags(argv[0]) + argv[1:]
    parsed = _parse(dataclass_types, argv)
    half = default_half_precision(parsed)
    if half:
        # Parsed again with the flag, so TrainingArguments (and a DeepSpeed config's "auto") see it from the start.
        parsed = _parse(dataclass_types, [*argv, f"--{half}"])
        next(p for p in parsed if isinstance(p, TrainArguments)).chosen_precision = half
    return parsed


def _parse(dataclass_types, argv: list[str]):
    try:
        *parsed, unknown = _Parser(dataclass_types).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # TrainingArguments' own checks of the flags it was given
        raise UserError(" ".join(str(error).split())) from None
    if unknown:
        raise UserError(f"unknown argument(s): {' '.join(unknown)} (see --help for the flags)")
    return parsed


def default_half_precision(parsed) -> str | None:
    """"bf16" or "fp16" for a training run that chose no precision, where this machine computes in it natively."""
    model = next((p for p in parsed if isinstance(p, ModelArguments)), None)
    training = next((p for p in parsed if isinstance(p, TrainArguments)), None)
    if model is None or training is None or model.torch_dtype != "auto" or training.bf16 or training.fp16:
        return None
    return {"bfloat16": "bf16", "float16": "fp16"}.get(run.native_half())


class _Parser(HfArgumentParser):
    """argparse's own complaints ("argument --lora_rank: invalid int value: 'x'", a missing required flag)
    become one `error:` line instead of the whole usage text followed by the message."""

    def error(self, message: str):
        raise UserError(message)


def _file_as_flags(path: str) -> list[str]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such argument file")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise UserError(f"{path}: line {mark.line + 1 if mark else '?'}: cannot parse the argument file") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of argument names to values")
    flags = []
    for name, value in values.items():
        if value is None:  # `name: null` (or an empty YAML value) leaves the default
            continue
        if isinstance(value, (dict, list)) and name != "report_to":
            value = json.dumps(value) if isinstance(value, dict) else ",".join(map(str, value))
        flags += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return flags


MERGE_DTYPES = ("auto", "float32", "bfloat16", "float16")
MERGE_TARGETS = ("dequantized", "original")


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
    dtype: str = field(
        default="auto",
        metadata={
            "help": f"dtype of the saved weights, one of {', '.join(MERGE_DTYPES)}. The merge itself is done in "
            "float32. 'auto' = the dtype the base checkpoint is stored in (float32 if it does not say)."
        },
    )
    merge_into: str = field(
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

    def __post_init__(self):
        if self.dtype not in MERGE_DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(MERGE_DTYPES)}")
        if self.merge_into not in MERGE_TARGETS:
            raise UserError(f"--merge_into {self.merge_into!r} is unknown; choose dequantized or original")


@dataclass
class PredictArguments:
    """Flags of predict_fora.py. The seed's names come first; LLaMA-Factory's names are aliases of the same flag.

    Lengths, as in the seed: `--max_src_len` cuts the prompt (the way training cut it), `--max_len`
    caps prompt + generated tokens per record, `--max_new_tokens` caps generated tokens. A record
    may generate min(max_new_tokens, max_len - its prompt length) tokens, at least 1; with neither
    flag, the max_target_length recorded at training (else 512).
    """

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for generated_predictions.jsonl and predict_results.json (required; may be the "
            "adapter folder). Files already there are kept unless --overwrite_output_dir."
        },
    )
    model_dir: str | None = field(
        default=None,
        metadata={
            "aliases": ["--checkpoint_dir", "--adapter_name_or_path"],
            "help": "What to evaluate: a LoRA/FoRA/QLoRA adapter folder (its base is loaded as it was trained, "
            "from fora_run.json, 4-bit included), a merged or fully fine-tuned model folder (config.json + "
            "weights), or unset to score the base model itself. --checkpoint_dir is the same flag.",
        },
    )
    ori_model_dir: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "Base model folder under an adapter; overrides the base recorded in fora_run.json. Without "
            "--model_dir this is the model scored. Default: the recorded base, else the embedded "
            "SmolLM2-135M-Instruct.",
        },
    )
    test_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--test_file"],
            "help": "Test data, JSON array or JSON Lines, in any format training reads. A record without a "
            "reference gets a prediction but no score.",
        },
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with a dataset_info.json registry (LLaMA-Factory style), used with --dataset."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Name of the test set in DATASET_DIR/dataset_info.json (instead of --test_path)."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "auto, alpaca, promptcblue, columns, xtuner or sharegpt, as in training."},
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Field holding the user's text (default: as recorded at training, else per format)."}
    )
    response_column: str | None = field(
        default=None, metadata={"help": "Field holding the reference (default: as recorded at training, else per format)."}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N records of the test data (for a quick check)."}
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt format (see train_lora.py --help). Default: the template recorded in fora_run.json, "
            "else chosen from the tokenizer as training does."
        },
    )
    max_src_len: int | None = field(
        default=None,
        metadata={
            "aliases": ["--max_source_length"],
            "help": "Prompt tokens kept per turn, cut exactly as training cuts them: the END of the user's text "
            "is cut, the template (system text, headers, special tokens) is kept whole. Default: the training "
            "--max_source_length recorded in fora_run.json, else 512.",
        },
    )
    max_len: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens per record, prompt + generated (the seed's meaning): a record generates at most "
            "max_len minus its prompt length, at least 1. Unset: no total limit."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens generated per record. Unset: limited by --max_len if given, else the training "
            "--max_target_length recorded in fora_run.json, else 512."
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "aliases": ["--per_device_eval_batch_size"],
            "help": "Prompts decoded together (grouped by length). Their common start is encoded once and the rest "
            "in length-sorted chunks, so a larger batch costs mostly KV-cache memory (rows x (prompt + new tokens)) "
            "and decodes faster. Unset: the largest batch that fits, starting from 64 (or the number of records) and "
            "halving on out-of-memory. Greedy output does not depend on it in float32; in bf16 a matmul "
            "rounds differently with the batch's shape, so some outputs change with it.",
        },
    )
    do_sample: bool = field(
        default=False, metadata={"help": "Sample with --temperature/--top_p; off = greedy (or beam search)."}
    )
    num_beams: int = field(default=1, metadata={"help": "Beam search width; 1 = no beam search."})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    seed: int = field(default=42, metadata={"help": "Random seed, for --do_sample."})
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": f"dtype to run in, one of {', '.join(DTYPES)}. 'auto' = the dtype recorded at training, else "
            "float32. Without CUDA, half precision becomes bfloat16 where the CPU has it natively, else float32."
        },
    )
    quantization_bit: int | None = field(
        default=None,
        metadata={"help": "Load the base in 4 or 8 bit. Default: as the adapter was trained (fora_run.json)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model's own Python code. Off by default, also when the adapter was trained with it."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace generated_predictions.jsonl / predict_results.json left in --output_dir by an earlier run."},
    )
    padding_side: str = field(
        default="left",
        metadata={
            "help": "Accepted for LLaMA-Factory command lines. Generation always pads on the left; 'right' "
            "(a training setting) is ignored here with a note."
        },
    )
    do_eval: bool = field(
        default=False,
        metadata={"help": "Accepted for LLaMA-Factory command lines; this script always generates and scores."},
    )
    do_predict: bool = field(
        default=False,
        metadata={"help": "Accepted for LLaMA-Factory command lines; this script always generates and scores."},
    )
    predict_with_generate: bool = field(
        default=False,
        metadata={"help": "Accepted for LLaMA-Factory command lines; this script always generates and scores."},
    )
    use_model_generation_config: bool = field(
        default=False,
        metadata={
            "help": "Decode with the model's own generation_config.json (its sampling, top-k/top-p and repetition "
            "penalty) instead of --do_sample/--num_beams/--temperature/--top_p. Off: greedy (or what those flags "
            "ask for) with every penalty off, whatever the model folder carries."
        },
    )

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("--output_dir is required (where generated_predictions.jsonl and predict_results.json go)")
        if self.model_dir and "," in self.model_dir:
            raise UserError(f"--model_dir {self.model_dir}: give one adapter or model folder, not a list")
        for name in ("max_src_len", "max_len", "max_new_tokens", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        for name in ("batch_size", "num_beams"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.torch_dtype not in DTYPES:
            raise UserError(f"--torch_dtype {self.torch_dtype!r} is unknown; choose one of: {', '.join(DTYPES)}")
        if self.quantization_bit not in (None, 4, 8):
            raise UserError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")
        if self.padding_side not in ("left", "right"):
            raise UserError(f"--padding_side must be left or right, got {self.padding_side!r}")
        if self.data_format not in ("auto", "alpaca", "promptcblue", "columns", "xtuner", "sharegpt"):
            raise UserError(f"--data_format {self.data_format!r} is unknown")
        check_template_name(self.template)
        if self.dataset:
            if self.test_path:
                raise UserError("give either --test_path or --dataset, not both")
            self.test_path, query, response = registered_dataset(self.dataset_dir, self.dataset)
            self.prompt_column = self.prompt_column or query
            self.response_column = self.response_column or response
        if not self.test_path:
            raise UserError("--test_path (or --dataset_dir with --dataset) is required")


def registered_dataset(dataset_dir: str | None, name: str) -> tuple[str, str | None, str | None]:
    """File path, query column and response column of dataset NAME in DATASET_DIR/dataset_info.json."""
    registry = Path(dataset_dir or "data") / "dataset_info.json"
    if not registry.is_file():
        raise UserError(f"{registry}: no such file (needed by --dataset {name})")
    entries = read_json(registry)
    if not isinstance(entries, dict) or name not in entries:
        known = ", ".join(entries) if isinstance(entries, dict) else "nothing"
        raise UserError(f"{registry}: no dataset named {name!r} (has: {known})")
    entry = entries[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise UserError(f"{registry}: dataset {name!r} has no \"file_name\"")
    columns = entry.get("columns") or {}
    # LLaMA-Factory's "prompt" is the instruction, "query" the input; alpaca records join both by
    # themselves, so "prompt" names the user's text only when there is no "query" and it is not "instruction".
    prompt = columns.get("prompt") if columns.get("prompt") != "instruction" else None
    return str(registry.parent / entry["file_name"]), columns.get("query") or prompt, columns.get("response")


@dataclass
class FederatedArguments:
    """Flags of train_federated.py, on top of train_lora.py's: who trains on what, for how many rounds.

    `--validation_file` (DataArguments) is the server's held-out set: the global adapter is scored on it
    before the first round and after every round.
    """

    num_clients: int = field(
        default=2,
        metadata={"help": "Clients (sites) the training data is split across. With --partition files: one per --client_files entry."},
    )
    num_rounds: int = field(
        default=3, metadata={"help": "Federated rounds: every client trains locally, then the server averages the adapters."}
    )
    local_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps each client takes per round (default when --local_epochs is not given: 10)."},
    )
    local_epochs: float | None = field(
        default=None, metadata={"help": "Passes over its own data each client makes per round, instead of --local_steps."}
    )
    partition: str = field(
        default="iid",
        metadata={
            "help": "How --train_file is split across clients: iid (shuffled with --seed, equal shares), field:NAME "
            "(by the value of the record field NAME: every value goes whole to one client, so clients differ), "
            "or files (each client's own file, from --client_files)."
        },
    )
    client_files: str | None = field(
        default=None, metadata={"help": "Comma-separated data files, one per client, with --partition files."}
    )
    min_fit_clients: int | None = field(
        default=None,
        metadata={
            "help": "Fewest clients whose update a round needs: a round starts once this many are connected, clients "
            "that fail or time out are named in the log and left out, and a round with fewer updates keeps the "
            "previous global adapter. Default: all --num_clients."
        },
    )
    proximal_mu: float = field(
        default=0.0,
        metadata={
            "help": "FedProx: each client adds mu/2 * ||w - w_global||^2 over its adapter weights to its loss, which "
            "keeps clients with different data from drifting apart. 0 = plain FedAvg."
        },
    )
    server_learning_rate: float = field(
        default=1.0,
        metadata={
            "help": "FedAvgM's server step: the global adapter moves by this times the clients' example-weighted mean "
            "change. 1 = FedAvg (the new global adapter is the mean, which moves about as far as one client's "
            "local steps). Above 1 moves it further per round; a LoRA/FoRA product of factors then changes by "
            "about the square of it, so raise it in small steps."
        },
    )
    server_momentum: float = field(
        default=0.0, metadata={"help": "FedAvgM's server momentum: the fraction of the previous round's move added to this one. 0 = none."}
    )
    server_optimizer: Literal["fedavgm", "adamw"] = field(
        default="fedavgm",
        metadata={
            "help": "The server's step. fedavgm: Flower's FedAvgM (--server_learning_rate, --server_momentum; 1 and 0 "
            "are FedAvg), clients train with the run's optimizer. adamw: FedOpt (Reddi et al., 2021) with the run's "
            "optimizer moved to the server: each client takes plain SGD steps at --client_learning_rate, and the "
            "server reads the clients' example-weighted mean change, divided by that rate, as minus a gradient: "
            "clipped to --max_grad_norm, one AdamW step per round (--learning_rate, --lr_scheduler_type and its "
            "warmup over --num_rounds steps, --adam_beta1/2, --adam_epsilon, --weight_decay). With --local_steps 1 "
            "every round is one AdamW step on the example-weighted mean of the clients' batch gradients: a centralised "
            "run on batches of clients x batch size, but for how a batch is drawn (a share from each site) and weighted."
        },
    )
    client_learning_rate: float = field(
        default=0.01,
        metadata={
            "help": "With --server_optimizer adamw: the clients' constant SGD rate. With --local_steps 1 it cancels out "
            "(the server divides it away); with more local steps it sets how far a client drifts in a round."
        },
    )
    round_timeout: float = field(
        default=3600.0, metadata={"help": "Seconds the server waits for client updates in a round; late clients are dropped from it."}
    )
    eval_generate: bool = field(
        default=False,
        metadata={
            "help": "Also generate answers for --validation_file after every round and score them (ROUGE-L, BLEU-4, "
            "as predict_fora.py does). Slower than the eval loss alone."
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Differential privacy (Flower's client-side fixed clipping): Gaussian noise of standard deviation "
            "noise_multiplier * clipping_norm / clients is added to the averaged update. Needs --dp_clipping_norm."
        },
    )
    dp_clipping_norm: float | None = field(
        default=None,
        metadata={"help": "Differential privacy: each client clips its update (its adapter minus the global one) to this L2 norm."},
    )
    client_cpus: float = field(
        default=1.0,
        metadata={"help": "Simulation only: CPU cores reserved per simulated client; clients run in parallel as cores allow."},
    )

    def __post_init__(self):
        for name in ("num_clients", "num_rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.local_steps is not None and self.local_epochs is not None:
            raise UserError("give either --local_steps or --local_epochs, not both")
        if self.local_epochs is None and self.local_steps is None:
            self.local_steps = 10
        if self.local_steps is not None and self.local_steps < 1:
            raise UserError(f"--local_steps must be at least 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise UserError(f"--local_epochs must be positive, got {self.local_epochs}")
        if self.partition == "files":
            if not self.client_files:
                raise UserError("--partition files needs --client_files a.json,b.json,...")
            self.num_clients = len(self.client_file_list())
        elif self.client_files:
            raise UserError("--client_files goes with --partition files")
        elif self.partition != "iid" and not (self.partition.startswith("field:") and self.partition[len("field:"):]):
            raise UserError(f"--partition {self.partition!r} is unknown; choose iid, field:NAME or files")
        if self.min_fit_clients is None:
            self.min_fit_clients = self.num_clients
        if not 1 <= self.min_fit_clients <= self.num_clients:
            raise UserError(f"--min_fit_clients must be between 1 and --num_clients {self.num_clients}, got {self.min_fit_clients}")
        if self.proximal_mu < 0:
            raise UserError(f"--proximal_mu must not be negative, got {self.proximal_mu}")
        if self.server_learning_rate <= 0:
            raise UserError(f"--server_learning_rate must be positive, got {self.server_learning_rate}")
        if not 0 <= self.server_momentum < 1:
            raise UserError(f"--server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.server_optimizer == "adamw":
            if (self.server_learning_rate, self.server_momentum) != (1.0, 0.0):
                raise UserError("--server_learning_rate and --server_momentum are FedAvgM's; with --server_optimizer "
                                "adamw the server steps at --learning_rate")
            if self.dp_noise_multiplier is not None:
                raise UserError("differential privacy goes with --server_optimizer fedavgm: Flower adds its noise after "
                                "the server's step, where under adamw it no longer masks the clients' mean update")
        if self.client_learning_rate <= 0:
            raise UserError(f"--client_learning_rate must be positive, got {self.client_learning_rate}")
        if self.round_timeout <= 0:
            raise UserError(f"--round_timeout must be positive, got {self.round_timeout}")
        if (self.dp_noise_multiplier is None) != (self.dp_clipping_norm is None):
            raise UserError("differential privacy needs both --dp_noise_multiplier and --dp_clipping_norm")
        if self.dp_noise_multiplier is not None and (self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0):
            raise UserError("--dp_noise_multiplier must not be negative and --dp_clipping_norm must be positive")
        if self.client_cpus <= 0:
            raise UserError(f"--client_cpus must be positive, got {self.client_cpus}")

    def client_file_list(self) -> list[str]:
        return [name.strip() for name in (self.client_files or "").split(",") if name.strip()]


def _same_flag_as(arguments_class, name: str):
    """A field defined like `name` of `arguments_class` (default, aliases and help), so both scripts
    take the flag with one meaning."""
    original = arguments_class.__dataclass_fields__[name]
    return field(default=original.default, metadata=original.metadata)


@dataclass
class ChatArguments:
    """Flags of web_demo.py and cli_demo.py: predict_fora.py's model flags, then the chat's own.

    The web page takes them after `--`: `streamlit run web_demo.py -- --model_dir output/demo/adapter`.
    The sampling flags are the starting values of the page's sidebar.
    """

    model_dir: str | None = _same_flag_as(PredictArguments, "model_dir")
    ori_model_dir: str | None = _same_flag_as(PredictArguments, "ori_model_dir")
    template: str | None = _same_flag_as(PredictArguments, "template")
    max_src_len: int | None = _same_flag_as(PredictArguments, "max_src_len")
    torch_dtype: str = _same_flag_as(PredictArguments, "torch_dtype")
    quantization_bit: int | None = _same_flag_as(PredictArguments, "quantization_bit")
    trust_remote_code: bool = _same_flag_as(PredictArguments, "trust_remote_code")
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens of one reply."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; 0 = greedy (always the most likely token)."}
    )
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling: draw from the most likely tokens that hold this much probability."}
    )
    system: str | None = field(
        default=None, metadata={"help": "System prompt put before the conversation; unset: the template's own, if any."}
    )
    side_by_side: bool = field(
        default=False,
        metadata={
            "help": "With an adapter: answer every message twice, with the fine-tuned model and with its base "
            "(the adapter switched off), to see what the fine-tune changed."
        },
    )

    def __post_init__(self):
        if self.model_dir and "," in self.model_dir:
            raise UserError(f"--model_dir {self.model_dir}: give one adapter or model folder, not a list")
        for name in ("max_src_len", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        if self.temperature < 0:
            raise UserError(f"--temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.torch_dtype not in DTYPES:
            raise UserError(f"--torch_dtype {self.torch_dtype!r} is unknown; choose one of: {', '.join(DTYPES)}")
        if self.quantization_bit not in (None, 4, 8):
            raise UserError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")
        check_template_name(self.template)
