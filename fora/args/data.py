"""Flags that choose the data, its format, the prompt template and the lengths it is cut to."""

from dataclasses import dataclass, field
from pathlib import Path

from fora.data.formats import DataFormat, EmptyResponse
from fora.data.templates import TemplateName
from fora.errors import UserError
from fora.io import read_json

DEFAULT_LENGTH = 512  # prompt and reply tokens per turn, when neither a flag nor the run record says


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
    data_format: DataFormat = field(
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
    empty_response: EmptyResponse = field(
        default="train",
        metadata={
            "help": "A record whose response is empty text: train (learn to answer with EOS alone, e.g. "
            "nothing to extract), skip (leave it out), or error (stop). The log counts them; with train, a file "
            "in which more than half the responses are empty (a test split, say) stops the run."
        },
    )
    template: TemplateName | None = field(
        default=None,
        metadata={
            "help": "Prompt format: a name from fora/data/templates.py (default, alpaca, vicuna, chatml, qwen, llama2, "
            "llama3, baichuan, baichuan2, chatglm2, chatglm3, internlm2, empty) or chat_template. Unset or auto: "
            "the model family's own format where config.json and the tokenizer tell it (Baichuan/Baichuan2 chat, "
            "ChatGLM2/3, InternLM2), else the tokenizer's chat template if it has one, else default "
            "('Human: ...\\n\\nAssistant: ')."
        },
    )
    max_source_length: int = field(
        default=DEFAULT_LENGTH,
        metadata={
            "help": "Prompt tokens kept per turn, template included. A longer prompt loses the END of the user's "
            "text (its start, where the instruction is, stays); the template's system text, role headers and "
            "special tokens are never cut (a limit they alone exceed is an error)."
        },
    )
    max_target_length: int = field(
        default=DEFAULT_LENGTH, metadata={"help": "Response tokens kept per turn, EOS included; longer responses are cut."}
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
        if self.dataset:
            self._resolve_dataset()

    def _resolve_dataset(self):
        """Turn --dataset_dir + --dataset into a file path and column names."""
        path, query, response = registered_dataset(self.dataset_dir, self.dataset)
        self.train_file = self.train_file or path
        self.prompt_column = self.prompt_column or query
        self.response_column = self.response_column or response


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
