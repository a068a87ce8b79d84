"""Fixtures of the data tests: the tokenizer without a chat template, a file with an empty response."""

import pytest

from fora.models.tokenizer import load_tokenizer
from support import ALPACA, write_jsonl


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_plain):
    """SmolLM2's tokenizer without a chat template (eos = pad = <|im_end|>)."""
    return load_tokenizer(str(tiny_model_plain))


@pytest.fixture
def with_empty(tmp_path):
    """Two records, the second one's response empty (for --empty_response train | skip | error)."""
    return write_jsonl(tmp_path / "d.json", [ALPACA, {**ALPACA, "input": "Nothing here.", "output": ""}])
