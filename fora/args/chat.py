"""Flags of web_demo.py and cli_demo.py: predict_fora.py's model flags, then the chat's own."""

from dataclasses import dataclass, field
from typing import Literal

from fora.args.predict import PredictArguments
from fora.data.templates import TemplateName
from fora.errors import UserError
from fora.precision import DtypeChoice


def same_flag_as(arguments_class, name: str):
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

    model_dir: str | None = same_flag_as(PredictArguments, "model_dir")
    ori_model_dir: str | None = same_flag_as(PredictArguments, "ori_model_dir")
    template: TemplateName | None = same_flag_as(PredictArguments, "template")
    max_source_length: int | None = same_flag_as(PredictArguments, "max_source_length")
    torch_dtype: DtypeChoice = same_flag_as(PredictArguments, "torch_dtype")
    quantization_bit: Literal[4, 8] | None = same_flag_as(PredictArguments, "quantization_bit")
    trust_remote_code: bool = same_flag_as(PredictArguments, "trust_remote_code")
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

    compare_dir: str | None = field(
        default=None,
        metadata={
            "help": "A second adapter trained on the same base as --model_dir: answer every message with both "
            "adapters side by side (the base stays in memory once)."
        },
    )

    def __post_init__(self):
        if self.model_dir and "," in self.model_dir:
            raise UserError(f"--model_dir {self.model_dir}: give one adapter or model folder, not a list")
        for name in ("max_source_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        if self.temperature < 0:
            raise UserError(f"--temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
