"""fora/args/method.py: the adapter flags, --lora_config merged under the command line, --use_lora."""

import json

import pytest

from support import flag_error, parse_flags

pytestmark = pytest.mark.usefixtures("keep_environment")


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
    finetuning = parse_flags(out, "--lora_config", lora_config)[2]
    assert (finetuning.lora_rank, finetuning.lora_alpha, finetuning.lora_dropout) == (8, 32, 0.1)
    assert finetuning.lora_target == "q_proj,v_proj" and finetuning.modules_to_save == "embed_tokens"


def test_command_line_wins_over_lora_config(out, lora_config):
    finetuning = parse_flags(out, "--lora_config", lora_config, "--lora_rank", "2")[2]
    assert finetuning.lora_rank == 2
    assert finetuning.lora_alpha == 32  # the CLI gave no alpha: the file's
    finetuning = parse_flags(out, "--lora_config", lora_config, "--lora_alpha", "4", "--lora_dropout", "0", "--lora_target", "o_proj")[2]
    assert (finetuning.lora_rank, finetuning.lora_alpha, finetuning.lora_dropout) == (8, 4, 0)
    assert finetuning.lora_target == "o_proj"


def test_adapter_defaults_without_a_file(out):
    finetuning = parse_flags(out)[2]
    assert finetuning.finetuning_type == "lora"
    assert (finetuning.lora_rank, finetuning.lora_alpha, finetuning.lora_dropout) == (8, 16, 0.0)
    assert finetuning.lora_target is None and finetuning.modules_to_save is None
    assert parse_flags(out, "--lora_rank", "4")[2].lora_alpha == 8


def test_lora_config_errors(out, tmp_path):
    path = tmp_path / "lora.json"
    assert flag_error(out, "--lora_config", str(path)) == f"--lora_config {path}: no such file"
    path.write_text('{"lora_r": 8,\n "lora_alpha": }')
    assert flag_error(out, "--lora_config", str(path)).startswith(f"--lora_config {path}: line 2: invalid JSON")
    path.write_text('{"lora_rank": 8}')
    assert "unknown field(s) ['lora_rank']" in flag_error(out, "--lora_config", str(path))
    path.write_text("[8, 16]")
    assert flag_error(out, "--lora_config", str(path)).startswith(f"--lora_config {path}: expected a JSON object")


@pytest.mark.parametrize("finetuning_type", ["lora", "fora", "full"])
def test_use_lora_false_is_full_fine_tuning(out, finetuning_type):
    assert parse_flags(out, "--finetuning_type", finetuning_type, "--use_lora", "False")[2].finetuning_type == "full"
    assert parse_flags(out, "--finetuning_type", finetuning_type)[2].finetuning_type == finetuning_type
