"""fora/args/predict.py: predict_fora.py's flag mistakes, each a one-line error."""

import re

import pytest

from fora.errors import UserError


def predict(*flags: str) -> dict:
    """predict_fora.main in this process (the CLI tests below go through a real subprocess)."""
    from fora.infer import predict as predict_fora

    return predict_fora.main(list(flags))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--test_path", "data/test.json"], "--output_dir is required"),
        (["--output_dir", "x"], "--test_path (or --dataset_dir with --dataset) is required"),
        (["--output_dir", "x", "--dataset", "nope"], "no dataset named 'nope'"),
        (["--output_dir", "x", "--test_path", "data/test.json", "--model_dir", "a,b"], "not a list"),
        (["--output_dir", "x", "--test_path", "data/test.json", "--max_len", "0"], "--max_len must be at least 1"),
        (["--output_dir", "x", "--test_path", "data/test.json", "--model_dir", "no/such/dir"], "no such folder"),
    ],
)
def test_flag_mistakes(flags, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        predict(*flags)
