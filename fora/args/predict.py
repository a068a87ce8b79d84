"""Flags of predict_fora.py. The seed's names come first; LLaMA-Factory's names are aliases of the same flag."""

from dataclasses import dataclass, field
from typing import Literal

from fora.args.data import DEFAULT_LENGTH, registered_dataset
from fora.data.formats import DataFormat
from fora.data.templates import TemplateName
from fora.errors import UserError
from fora.precision import DtypeChoice


@dataclass
class PredictArguments:
    """Flags of predict_fora.py. The seed's names come first; LLaMA-Factory's names are aliases of the same flag.

    Lengths, as in the seed: `--max_source_length` (the seed's `--max_src_len`) cuts the prompt (the way training cut it), `--max_len`
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
    data_format: DataFormat = field(default="auto", metadata={"help": "The data's format, as in training."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Field holding the user's text (default: as recorded at training, else per format)."}
    )
    response_column: str | None = field(
        default=None, metadata={"help": "Field holding the reference (default: as recorded at training, else per format)."}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N records of the test data (for a quick check)."}
    )
    template: TemplateName | None = field(
        default=None,
        metadata={
            "help": "Prompt format (see train_lora.py --help). Default: the template recorded in fora_run.json, "
            "else chosen from the tokenizer as training does."
        },
    )
    max_source_length: int | None = field(
        default=None,
        metadata={
            "aliases": ["--max_src_len"],
            "help": "Prompt tokens kept per turn, cut exactly as training cuts them: the END of the user's text "
            "is cut, the template (system text, headers, special tokens) is kept whole. Default: the training "
            f"--max_source_length recorded in fora_run.json, else {DEFAULT_LENGTH}. --max_src_len is the same flag.",
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
            f"--max_target_length recorded in fora_run.json, else {DEFAULT_LENGTH}."
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
    torch_dtype: DtypeChoice = field(
        default="auto",
        metadata={
            "help": "dtype to run in. 'auto' = the dtype recorded at training, else "
            "float32. Without CUDA, half precision becomes bfloat16 where the CPU has it natively, else float32."
        },
    )
    quantization_bit: Literal[4, 8] | None = field(
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
    padding_side: Literal["left", "right"] = field(
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
        for name in ("max_source_length", "max_len", "max_new_tokens", "max_samples"):
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
        if self.dataset:
            if self.test_path:
                raise UserError("give either --test_path or --dataset, not both")
            self.test_path, query, response = registered_dataset(self.dataset_dir, self.dataset)
            self.prompt_column = self.prompt_column or query
            self.response_column = self.response_column or response
        if not self.test_path:
            raise UserError("--test_path (or --dataset_dir with --dataset) is required")
