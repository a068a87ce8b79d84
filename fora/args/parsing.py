"""Parsing flags into the argument dataclasses, once.

A single `.json` or `.yaml` file given instead of flags is read as the whole argument set (flags after it
override the file). A training run's precision (--torch_dtype, --bf16, --fp16) is decided by
`fora.precision.training_precision` between reading the flags and building the dataclasses, so
`TrainingArguments` (DeepSpeed's "auto" values, accelerate's mixed precision) sees the decided one.
argparse's own complaints become one `error:` line.
"""

import dataclasses
import json
import sys
from pathlib import Path

from transformers import HfArgumentParser

from fora.args.training import TrainArguments
from fora.errors import UserError
from fora.precision import training_precision

ARGUMENT_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def parse_args(dataclass_types, argv: list[str] | None = None, cuda: bool | None = None) -> list:
    """The dataclasses of `dataclass_types` from `argv` (default: sys.argv), in that order. `cuda`: the training
    run's device has CUDA (default: this machine's answer; see fora.precision.training_precision)."""
    argv = sys.argv[1:] if argv is None else argv
    if is_argument_file(argv):
        argv = argument_file_flags(argv[0]) + argv[1:]
    namespace, unknown = _Parser(dataclass_types).parse_known_args(args=argv)
    if unknown:
        raise UserError(f"unknown argument(s): {' '.join(unknown)} (see --help for the flags)")
    precision = None
    if TrainArguments in dataclass_types and hasattr(namespace, "torch_dtype"):
        precision = training_precision(namespace.torch_dtype, namespace.bf16, namespace.fp16, cuda)
        namespace.torch_dtype, namespace.bf16, namespace.fp16 = precision.dtype, precision.mixed == "bf16", precision.mixed == "fp16"
    parsed = []
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            parsed.append(cls(**{name: value for name, value in vars(namespace).items() if name in names}))
        except ValueError as error:  # TrainingArguments' own checks of the flags it was given
            raise UserError(" ".join(str(error).split())) from None
    for arguments in parsed:
        if isinstance(arguments, TrainArguments):
            arguments.precision = precision
    return parsed


def settings_given(dataclass_types, argv: list[str]) -> list[str]:
    """The fields `argv` sets to other than their defaults (abbreviations and aliases resolved as parse_args
    resolves them), then any flag no field knows, by name."""
    given, unknown = _Parser(dataclass_types).parse_known_args(args=argv)
    default, _ = _Parser(dataclass_types).parse_known_args(args=[])
    changed = [name for name, value in vars(given).items() if value != getattr(default, name)]
    return changed + [flag.lstrip("-").split("=")[0] for flag in unknown if flag.startswith("-")]


def is_argument_file(argv: list[str]) -> bool:
    return bool(argv) and argv[0].endswith(ARGUMENT_FILE_SUFFIXES) and not argv[0].startswith("-")


class _Parser(HfArgumentParser):
    """argparse's own complaints ("argument --lora_rank: invalid int value: 'x'", a missing required flag, a
    choice not among a flag's choices) become one `error:` line instead of the usage text and the message."""

    def error(self, message: str):
        raise UserError(message)


def argument_file_flags(path: str) -> list[str]:
    """The flags an argument file (YAML, or JSON, which YAML reads) holds."""
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

