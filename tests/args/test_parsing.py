"""fora/args/parsing.py: argument files (YAML, JSON) and flag errors that name the flag."""

import json

import pytest

from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.errors import UserError
from support import flag_error

pytestmark = pytest.mark.usefixtures("keep_environment")


ALL = (ModelArguments, DataArguments, FinetuningArguments, TrainArguments)


# --- argument files ------------------------------------------------------------------------------


def test_yaml_file_is_the_whole_argument_set_and_flags_after_it_override(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "train_file: data/train.json\n"
        "max_source_length: 64\n"
        "lora_rank: 4\n"
        "lora_target: [q_proj, v_proj]\n"
        "learning_rate: 1.0e-3\n"
        "fp16: false\n"
        "report_to: none\n"
        "cache_dir:\n"  # null: the default
    )
    model, data, finetuning, training = parse_args(ALL, argv=[str(path), "--lora_rank", "2"])
    assert data.train_file == "data/train.json" and data.max_source_length == 64 and data.cache_dir is None
    assert finetuning.lora_rank == 2  # the flag after the file wins
    assert finetuning.lora_alpha == 4  # default 2 r, from the winning r
    assert finetuning.lora_target == "q_proj,v_proj"
    assert training.learning_rate == 1e-3 and training.output_dir == str(tmp_path / "out")


def test_json_file_is_read_the_same_way(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "max_target_length": 32, "use_lora": False}))
    _, data, finetuning, _ = parse_args(ALL, argv=[str(path)])
    assert data.max_target_length == 32 and finetuning.finetuning_type == "full"


def test_argument_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such argument file"):
        parse_args(ALL, argv=[str(tmp_path / "missing.yaml")])
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(UserError, match=rf"^{path}: line \d+: cannot parse the argument file$"):
        parse_args(ALL, argv=[str(path)])
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping of argument names to values"):
        parse_args(ALL, argv=[str(path)])


# --- flag errors name the flag -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max_source_length", "0"], "--max_source_length must be at least 1, got 0"),
        (["--max_target_length", "-5"], "--max_target_length must be at least 1, got -5"),
        (["--learning_rate", "-0.0001"], "--learning_rate must not be negative, got -0.0001"),
        (["--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
        (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
        (["--fora_mid_ratio", "0"], "--fora_mid_ratio must be in (0, 1], got 0.0"),
        (["--finetuning_type", "qlora"],
         "argument --finetuning_type/--finetuning-type: invalid choice: 'qlora' (choose from "
         "'lora', 'fora', 'loha', 'lokr', 'ia3', 'adalora', 'oft', 'prefix', 'prompt', 'freeze', 'full')"),
        (["--data_format", "csv"], "argument --data_format/--data-format: invalid choice: 'csv' (choose from 'auto', "
                                   "'alpaca', 'promptcblue', 'columns', 'xtuner', 'sharegpt')"),
        (["--empty_response", "drop"],
         "argument --empty_response/--empty-response: invalid choice: 'drop' (choose from 'train', 'skip', 'error')"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1), got 1.5"),
    ],
)
def test_bad_flag_values(out, flags, expected):
    assert flag_error(out, *flags) == expected


def test_settings_given_names_what_a_flag_list_changes_abbreviations_and_aliases_resolved():
    from fora.args import FinetuningArguments, ModelArguments
    from fora.args.parsing import settings_given

    groups = (ModelArguments, FinetuningArguments)
    assert sorted(settings_given(groups, ["--lora_rank", "4", "--trust_remote"])) == ["lora_rank", "trust_remote_code"]
    assert settings_given(groups, ["--trust_remote_code", "false"]) == []  # its default: nothing changed
    assert settings_given(groups, ["--no_such_flag", "1", "--other=2"]) == ["no_such_flag", "other"]
