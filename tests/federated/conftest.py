"""Fixtures of the federated tests: one real simulation (2 clients x 2 rounds on the tiny model), run once."""

import pytest

from support import FLOWER_ENV, PYTHON, run_script, train_records, write_jsonl


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory, tiny_model):
    """A real simulation, 2 clients x 2 rounds on the tiny model: (its output folder, the process, its flags)."""
    folder = tmp_path_factory.mktemp("federated")
    train = write_jsonl(folder / "train.jsonl", train_records(24))
    validation = write_jsonl(folder / "validation.jsonl", train_records(6, start=100))
    out = folder / "out"
    flags = [
        "--model_name_or_path", str(tiny_model), "--train_file", str(train), "--validation_file", str(validation),
        "--num_clients", "2", "--num_rounds", "2", "--local_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-3", "--lora_rank", "4", "--max_source_length", "64", "--max_target_length", "32",
        "--output_dir", str(out), "--report_to", "none", "--eval_generate",
        "--torch_dtype", "float32",  # as the base file is stored; the history reports the base's size as loaded
        # Flower's DP wrapper and clipping mod in the loop, set so they change nothing (no noise, a norm never reached)
        "--dp_noise_multiplier", "0", "--dp_clipping_norm", "1000",
    ]
    result = run_script(PYTHON, "train_federated.py", *flags, timeout=420, env=FLOWER_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, flags
