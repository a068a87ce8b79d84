"""fora/args/training.py: the seeds' pre-transformers-5 flags, --deepspeed files, the logging folder."""

import pytest

from support import flag_error, parse_flags

pytestmark = pytest.mark.usefixtures("keep_environment")


def test_deepspeed_file_that_is_not_json(out, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": "auto",\n  zero_optimization: {}}')
    assert flag_error(out, "--deepspeed", str(path)).startswith(f"--deepspeed {path}: line 2: invalid JSON")
    missing = tmp_path / "none.json"
    assert flag_error(out, "--deepspeed", str(missing)) == f"--deepspeed {missing}: no such file"


# --- the seeds' flags that transformers 5 dropped --------------------------------------------------------


def test_warmup_ratio_maps_onto_fractional_warmup_steps(out):
    training = parse_flags(out, "--warmup_ratio", "0.1")[3]
    assert training.warmup_steps == 0.1
    assert parse_flags(out)[3].warmup_steps == 0


def test_group_by_length_maps_to_the_sampling_strategy(out):
    assert parse_flags(out, "--group_by_length")[3].train_sampling_strategy == "group_by_length"
    assert parse_flags(out, "--group_by_length", "False")[3].train_sampling_strategy != "group_by_length"


def test_logging_dir_defaults_under_the_output_dir(out):
    assert parse_flags(out)[3].logging_dir == f"{out}/runs"


# --- --gradient_checkpointing: auto (the default), or forced ---------------------------------------------


@pytest.mark.parametrize("flags, value", [((), "auto"), (("--gradient_checkpointing",), True),
                                          (("--gradient_checkpointing", "false"), False), (("--gradient_checkpointing", "True"), True),
                                          (("--gradient_checkpointing", "AUTO"), "auto")])
def test_gradient_checkpointing_auto_or_forced(out, flags, value):
    *_, training = parse_flags(out, *flags)
    assert training.gradient_checkpointing == value
    assert training.activation_checkpointing is (value is True)  # what transformers 5's Trainer reads
    training.use_gradient_checkpointing(True)
    assert training.gradient_checkpointing is True and training.activation_checkpointing is True


def test_gradient_checkpointing_rejects_other_values(out):
    assert flag_error(out, "--gradient_checkpointing", "sometimes") == (
        "--gradient_checkpointing must be auto, true or false, got 'sometimes'")
