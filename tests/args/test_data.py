"""fora/args/data.py: --dataset_dir / --dataset, the LLaMA-Factory dataset registry."""

import json

import pytest

from support import flag_error, parse_flags

pytestmark = pytest.mark.usefixtures("keep_environment")


# --- --dataset_dir / --dataset -------------------------------------------------------------------------


def test_dataset_registry_gives_file_and_columns(out, tmp_path):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"triples": {"file_name": "t.json", "columns": {"prompt": "instruction", "query": "q", "response": "r"}}})
    )
    data = parse_flags(out, "--dataset_dir", str(tmp_path), "--dataset", "triples")[1]
    assert (data.train_file, data.prompt_column, data.response_column) == (str(tmp_path / "t.json"), "q", "r")
    message = flag_error(out, "--dataset_dir", str(tmp_path), "--dataset", "other")
    assert message == f"{tmp_path / 'dataset_info.json'}: no dataset named 'other' (has: triples)"
    assert flag_error(out, "--dataset_dir", str(tmp_path / "x"), "--dataset", "triples").endswith(
        "no such file (needed by --dataset triples)"
    )
