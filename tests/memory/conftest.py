"""The memory tests' shared fixture: a run's Setting from train_lora.py's flags on the tiny model."""

import pytest


@pytest.fixture
def run_setting(tiny_model, tmp_path, monkeypatch):
    """setting(*flags): the Setting estimate_memory.py builds for `--model_name_or_path TINY FLAGS` (on a CPU unless
    --device cuda is among them)."""
    from fora.memory.plan import parse, setting, world_size

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)

    def build(*flags):
        memory, model, data, finetuning, training, cuda = parse(
            ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags]
        )
        return setting(model, data, finetuning, training, world_size(memory.num_devices), cuda)

    return build
