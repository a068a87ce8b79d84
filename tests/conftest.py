"""Fixtures shared by every test folder: tiny random causal LMs (hidden 64, 2 layers) with the default model's
tokenizer, torch on one thread, and the environment TrainArguments writes to. Helpers live in support.py."""

from pathlib import Path

import pytest

from support import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer has SmolLM2's chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_model_plain(tmp_path_factory) -> Path:
    """The same tiny Llama, its tokenizer without a chat template (named templates apply)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from fora.models.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread in this process for the module (use: pytestmark = usefixtures("one_thread"))."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def keep_environment(monkeypatch):
    """TrainArguments exports TENSORBOARD_LOGGING_DIR; restore it after the test (use: usefixtures("keep_environment"))."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


@pytest.fixture
def out(tmp_path):
    """An --output_dir that does not exist yet."""
    return str(tmp_path / "out")
