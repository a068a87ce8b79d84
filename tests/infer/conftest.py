"""Fixtures of the inference tests: an adapter that visibly changes the tiny model's replies."""

from pathlib import Path

import pytest

from support import peft_adapter


@pytest.fixture(scope="session")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model whose large random weights visibly change its replies."""
    return peft_adapter(tiny_model, tmp_path_factory.mktemp("chat-adapter"))
