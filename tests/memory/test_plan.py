"""fora/memory/plan.py: from a run's flags and data to what the estimate reads: the longest batch the training
sampler builds, ZeRO's stage, the model's config by folder or built-in name."""

import pytest

from fora.errors import UserError
from fora.memory.plan import longest_batch, model_config, parse, records_from_data, world_size, zero_settings
from support import REPO, parse_flags, tokenize_file, train_records, write_jsonl

pytestmark = pytest.mark.usefixtures("keep_environment")


def test_zero_settings():
    assert zero_settings(None) == (0, False)
    assert zero_settings(str(REPO / "ds_config.json")) == (2, False)
    assert zero_settings({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}) == (3, True)


@pytest.mark.parametrize("cuda, width", [(False, 17), (True, 24)])
def test_the_longest_batch_in_the_samplers_order(tmp_path, cuda, width):
    """In order (sequential), batches of 2: [5, 17] and [3, 9]; the first is the longest, padded to 8 on CUDA."""
    *_, training = parse_flags(str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--group_by_length", "false",
                               "--train_sampling_strategy", "sequential")
    assert longest_batch([5, 17, 3, 9], [2, 8, 1, 4], training, 1, cuda) == (width, 10)


def test_lengths_are_measured_from_the_training_file(tiny_model, tokenizer, tmp_path):
    """Tokenized as training tokenizes them: the longest batch of one row is the longest record, cut at the flags."""
    data = write_jsonl(tmp_path / "train.jsonl", train_records(12))
    flags = ["--model_name_or_path", str(tiny_model), "--train_file", str(data), "--output_dir", str(tmp_path / "out"),
             "--cache_dir", str(tmp_path / "cache"), "--max_source_length", "48", "--max_target_length", "40"]
    _, model, data_args, _, training, _ = parse(flags)
    lengths, trained = records_from_data(str(tiny_model), model, data_args, training)
    expected = [len(row["input_ids"]) for row in tokenize_file(tokenizer, data, max_source_length=48, max_target_length=40)]
    assert lengths == expected and max(lengths) < 48 + 40 + 8
    assert all(0 < t < n for t, n in zip(trained, lengths))


def test_a_model_neither_folder_nor_built_in_names_the_flag(tmp_path):
    model, _, finetuning, _ = parse_flags(str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"--model_name_or_path .*nothing: no config.json there, and not a built-in name"):
        model_config(model, finetuning)


def test_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert (world_size(None), world_size(8)) == (3, 8)
