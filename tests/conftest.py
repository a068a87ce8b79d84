"""Shared fixtures: tiny random causal LMs (hidden 64, 2 layers) with the default model's tokenizer."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_model(folder: Path, chat_template: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fora.models.load import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not chat_template:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


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


# One CPU thread for tests that run models: on a small shared machine, OpenMP threads spinning
# against other processes made a forward pass up to 20x slower. Results do not depend on it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread in this process for the module (use: pytestmark = usefixtures("one_thread"))."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_script(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command the way a user would; returns the finished process (check returncode yourself)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
