"""config.py: argument files, --lora_config merging, the seeds' pre-transformers-5 flags, and flag errors."""

import json

import pytest
import torch

from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.errors import UserError
from fora.precision import cpu_has_bf16

ALL = (ModelArguments, DataArguments, FinetuningArguments, TrainArguments)


@pytest.fixture(autouse=True)
def keep_environment(monkeypatch):
    # TrainArguments exports TENSORBOARD_LOGGING_DIR; restore it after each test.
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


def parse(out, *flags):
    return parse_args(ALL, argv=["--output_dir", out, *flags])


def user_error(out, *flags) -> str:
    with pytest.raises(UserError) as error:
        parse(out, *flags)
    message = str(error.value)
    assert "\n" not in message
    return message


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


# --- --lora_config and the adapter flags --------------------------------------------------------------


@pytest.fixture
def lora_config(tmp_path):
    path = tmp_path / "lora.json"
    path.write_text(
        json.dumps(
            {
                "lora_r": 8,
                "lora_alpha": 32,
                "lora_dropout": 0.1,
                "lora_target_modules": ["q_proj", "v_proj"],
                "modules_to_save": ["embed_tokens"],
            }
        )
    )
    return str(path)


def test_lora_config_file_is_read(out, lora_config):
    finetuning = parse(out, "--lora_config", lora_config)[2]
    assert (finetuning.lora_rank, finetuning.lora_alpha, finetuning.lora_dropout) == (8, 32, 0.1)
    assert finetuning.lora_target == "q_proj,v_proj" and finetuning.modules_to_save == "embed_tokens"


def test_command_line_wins_over_lora_config(out, lora_config):
    finetuning = parse(out, "--lora_config", lora_config, "--lora_rank", "2")[2]
    assert finetuning.lora_rank == 2
    assert finetuning.lora_alpha == 32  # the CLI gave no alpha: the file's
    finetuning = parse(out, "--lora_config", lora_config, "--lora_alpha", "4", "--lora_dropout", "0", "--lora_target", "o_proj")[2]
    assert (finetuning.lora_rank, finetuning.lora_alpha, finetuning.lora_dropout) == (8, 4, 0)
    assert finetuning.lora_target == "o_proj"


def test_adapter_defaults_without_a_file(out):
    finetuning = parse(out)[2]
    assert finetuning.finetuning_type == "lora"
    assert (finetuning.lora_rank, finetuning.lora_alpha, finetuning.lora_dropout) == (8, 16, 0.0)
    assert finetuning.lora_target is None and finetuning.modules_to_save is None
    assert parse(out, "--lora_rank", "4")[2].lora_alpha == 8


def test_lora_config_errors(out, tmp_path):
    path = tmp_path / "lora.json"
    assert user_error(out, "--lora_config", str(path)) == f"--lora_config {path}: no such file"
    path.write_text('{"lora_r": 8,\n "lora_alpha": }')
    assert user_error(out, "--lora_config", str(path)).startswith(f"--lora_config {path}: line 2: invalid JSON")
    path.write_text('{"lora_rank": 8}')
    assert "unknown field(s) ['lora_rank']" in user_error(out, "--lora_config", str(path))
    path.write_text("[8, 16]")
    assert user_error(out, "--lora_config", str(path)).startswith(f"--lora_config {path}: expected a JSON object")


@pytest.mark.parametrize("finetuning_type", ["lora", "fora", "full"])
def test_use_lora_false_is_full_fine_tuning(out, finetuning_type):
    assert parse(out, "--finetuning_type", finetuning_type, "--use_lora", "False")[2].finetuning_type == "full"
    assert parse(out, "--finetuning_type", finetuning_type)[2].finetuning_type == finetuning_type


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
         "argument --finetuning_type/--finetuning-type: invalid choice: 'qlora' (choose from 'lora', 'fora', 'full')"),
        (["--data_format", "csv"], "argument --data_format/--data-format: invalid choice: 'csv' (choose from 'auto', "
                                   "'alpaca', 'promptcblue', 'columns', 'xtuner', 'sharegpt')"),
        (["--empty_response", "drop"],
         "argument --empty_response/--empty-response: invalid choice: 'drop' (choose from 'train', 'skip', 'error')"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1), got 1.5"),
    ],
)
def test_bad_flag_values(out, flags, expected):
    assert user_error(out, *flags) == expected


def test_deepspeed_file_that_is_not_json(out, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": "auto",\n  zero_optimization: {}}')
    assert user_error(out, "--deepspeed", str(path)).startswith(f"--deepspeed {path}: line 2: invalid JSON")
    missing = tmp_path / "none.json"
    assert user_error(out, "--deepspeed", str(missing)) == f"--deepspeed {missing}: no such file"


# --- the seeds' flags that transformers 5 dropped --------------------------------------------------------


def test_warmup_ratio_maps_onto_fractional_warmup_steps(out):
    training = parse(out, "--warmup_ratio", "0.1")[3]
    assert training.warmup_steps == 0.1
    assert parse(out)[3].warmup_steps == 0


def test_group_by_length_maps_to_the_sampling_strategy(out):
    assert parse(out, "--group_by_length")[3].train_sampling_strategy == "group_by_length"
    assert parse(out, "--group_by_length", "False")[3].train_sampling_strategy != "group_by_length"


def test_logging_dir_defaults_under_the_output_dir(out):
    assert parse(out)[3].logging_dir == f"{out}/runs"


# --- precision on a CPU without CUDA --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies without CUDA")
def test_fp16_falls_back_with_one_warning_line(out, capfd):
    model, _, _, training = parse(out, "--fp16", "--torch_dtype", "float16")
    training.precision.report()
    dtype = training.precision.torch_dtype
    cpu_half = "bfloat16" if cpu_has_bf16() else "float32"
    assert dtype == getattr(torch, cpu_half) and not training.fp16
    assert training.bf16 == cpu_has_bf16()
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [f"warning: no CUDA here; --fp16 and --torch_dtype float16 -> {cpu_half} on this CPU"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies without CUDA")
def test_fp16_alone_warns_once_and_auto_dtype_follows(out, capfd):
    model, _, _, training = parse(out, "--fp16")
    training.precision.report()
    dtype = training.precision.torch_dtype
    cpu_half = "bfloat16" if cpu_has_bf16() else "float32"
    assert dtype == getattr(torch, cpu_half)
    assert capfd.readouterr().err.splitlines() == [f"warning: no CUDA here; --fp16 -> {cpu_half} on this CPU"]


def test_no_precision_flags_no_warning(out, capfd):
    """No flag: the machine's native half precision (bf16 on such a CPU, else float32), and no warning."""
    model, _, _, training = parse(out)
    training.precision.report()
    assert training.precision.torch_dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert capfd.readouterr().err == ""


# --- --dataset_dir / --dataset -------------------------------------------------------------------------


def test_dataset_registry_gives_file_and_columns(out, tmp_path):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"triples": {"file_name": "t.json", "columns": {"prompt": "instruction", "query": "q", "response": "r"}}})
    )
    data = parse(out, "--dataset_dir", str(tmp_path), "--dataset", "triples")[1]
    assert (data.train_file, data.prompt_column, data.response_column) == (str(tmp_path / "t.json"), "q", "r")
    message = user_error(out, "--dataset_dir", str(tmp_path), "--dataset", "other")
    assert message == f"{tmp_path / 'dataset_info.json'}: no dataset named 'other' (has: triples)"
    assert user_error(out, "--dataset_dir", str(tmp_path / "x"), "--dataset", "triples").endswith(
        "no such file (needed by --dataset triples)"
    )
