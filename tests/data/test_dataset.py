"""fora/data/dataset.py: the tokenized dataset, its cache (reused, rebuilt, keyed) and what it reports."""

import contextlib
import json
import re
from dataclasses import replace

import pytest

from fora.args import DataArguments
from fora.data.dataset import build_dataset
from fora.data.templates import NAMED_TEMPLATES, get_template
from support import ALPACA, data_error, masked_and_trained, write_jsonl

# --- build_dataset: cache, report -------------------------------------------------------------------


@contextlib.contextmanager
def main_process_first(desc=None):
    yield


def build(path, tokenizer, data_args, template=None):
    lines = []
    dataset = build_dataset(
        str(path), tokenizer, template or get_template(tokenizer, None), data_args, main_process_first, lines.append
    )
    return dataset, lines


@pytest.fixture
def data_args(tmp_path):
    return DataArguments(cache_dir=str(tmp_path / "cache"))


def test_build_dataset_columns_and_masking(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    dataset, lines = build(path, tokenizer, data_args)
    assert sorted(dataset.column_names) == ["input_ids", "labels", "length"]
    assert masked_and_trained(tokenizer, dataset[0])[1] == "pump_部件故障_leaks" + tokenizer.eos_token
    assert not any("Reusing" in line for line in lines)


def test_cache_is_reused_and_rebuilt_with_overwrite_cache(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, data_args)
    dataset, lines = build(path, tokenizer, data_args)
    assert any(line.startswith(f"Reusing tokenized {path}") for line in lines)
    assert masked_and_trained(tokenizer, dataset[0])[1] == "pump_部件故障_leaks" + tokenizer.eos_token
    _, lines = build(path, tokenizer, replace(data_args, overwrite_cache=True))
    assert not any("Reusing" in line for line in lines)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # rebuilt in place, no temporary folder left


def test_overwrite_cache_rebuilds_on_the_first_local_rank_only(tokenizer, tmp_path, data_args, monkeypatch):
    # Under a launcher the other ranks wait (main_process_first), then load what the first rank rebuilt.
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, data_args)
    monkeypatch.setenv("LOCAL_RANK", "1")
    _, lines = build(path, tokenizer, replace(data_args, overwrite_cache=True))
    assert any("Reusing" in line for line in lines)
    monkeypatch.setenv("LOCAL_RANK", "0")
    _, lines = build(path, tokenizer, replace(data_args, overwrite_cache=True))
    assert not any("Reusing" in line for line in lines)


def test_changed_data_or_limits_are_a_new_cache(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, data_args)
    write_jsonl(path, [{**ALPACA, "output": "changed"}])
    dataset, lines = build(path, tokenizer, data_args)
    assert not any("Reusing" in line for line in lines)
    assert masked_and_trained(tokenizer, dataset[0])[1] == "changed" + tokenizer.eos_token
    for changed in (dict(max_source_length=100), dict(max_target_length=100), dict(empty_response="skip")):
        _, lines = build(path, tokenizer, replace(data_args, **changed))
        assert not any("Reusing" in line for line in lines), changed
    _, lines = build(path, tokenizer, data_args, template=NAMED_TEMPLATES["chatml"])
    assert not any("Reusing" in line for line in lines)
    assert len(list((tmp_path / "cache").iterdir())) == 6


def test_default_cache_is_next_to_the_data(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, DataArguments())
    assert [p.name.split("-")[0] for p in (tmp_path / ".fora_cache").iterdir()] == ["d"]


def test_cut_records_are_counted_and_reported_also_from_the_cache(tokenizer, tmp_path):
    records = [ALPACA, {**ALPACA, "output": "very long answer " * 30}, {**ALPACA, "input": "long text " * 80}]
    path = write_jsonl(tmp_path / "d.json", records)
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), max_source_length=64, max_target_length=16)
    dataset, lines = build(path, tokenizer, data_args)
    assert len(dataset) == 3  # cut, never dropped
    expected = f"{path}: 2 of 3 records were cut to --max_source_length 64 / --max_target_length 16 (kept, shortened)"
    assert expected in lines
    assert max(dataset["length"]) <= 64 + 16
    dataset, lines = build(path, tokenizer, data_args)
    assert any("Reusing" in line for line in lines) and expected in lines
    assert "truncated" not in dataset.column_names


def test_nothing_cut_nothing_reported(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    _, lines = build(path, tokenizer, data_args)
    assert not any("cut" in line for line in lines)


@pytest.mark.parametrize(
    "policy, count, message",
    [("train", 2, "1 records have an empty response: trained to answer with EOS alone"), ("skip", 1, "left out")],
)
def test_build_dataset_reports_empty_responses(tokenizer, with_empty, tmp_path, policy, count, message):
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), empty_response=policy)
    dataset, lines = build(with_empty, tokenizer, data_args)
    assert len(dataset) == count
    assert any(message in line for line in lines)


def test_build_dataset_empty_response_error(tokenizer, with_empty, tmp_path):
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), empty_response="error")
    message = data_error(lambda: build(with_empty, tokenizer, data_args))
    assert message.startswith(f"{with_empty}: line 2: field 'output' is empty")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_nothing_left_after_skipping_is_a_user_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "output": ""}])
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), empty_response="skip")
    assert data_error(lambda: build(path, tokenizer, data_args)).startswith(f"{path}: no records left to train on")


def test_bad_data_stops_build_dataset(tokenizer, tmp_path, data_args):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA) + "\n{oops\n")
    assert data_error(lambda: build(path, tokenizer, data_args)).startswith(f"{path}: line 2: invalid JSON")


def test_limit_below_the_template_names_the_record(tokenizer, tmp_path, data_args):
    records = [ALPACA, {**ALPACA, "system": "You extract fault triples from Chinese repair notes. " * 5}]
    path = write_jsonl(tmp_path / "d.json", records)
    bare = get_template(tokenizer, None).encode(tokenizer, records[1]["system"], [("", None)])[0][0]
    limit = len(bare) - 5  # the first record fits, the second one's system text alone does not
    message = data_error(lambda: build(path, tokenizer, replace(data_args, max_source_length=limit)))
    assert re.fullmatch(
        rf"{re.escape(str(path))}: line 2: --max_source_length {limit} leaves no room for the user's text: "
        r"the template and system text alone take \d+ tokens",
        message,
    ), message
