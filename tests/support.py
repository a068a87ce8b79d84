"""The tests' shared helpers (tests/conftest.py holds only fixtures): where things are, running a command
as a user would, data files, the tiny model, and the builders tests in several folders use.

Test modules import them with `from support import ...` (pyproject.toml puts tests/ on the path).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = shutil.which("python") or "python"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite asks the CPU path's questions (exactness whatever the number of processes, numbers recorded on a
# CPU, its fallback lines), on a GPU machine too: CUDA is hidden from it and from every process it starts, and
# DeepSpeed takes its CPU accelerator. The GPU path is scripts/gpu_check.sh's. (Set before torch looks.)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DS_ACCELERATOR"] = "cpu"
GPU_MACHINE = shutil.which("nvidia-smi") is not None


def launcher(name: str, processes: int) -> list[str]:
    """The command starting `processes` CPU processes of a script: "torchrun", or "deepspeed" (the script gets
    --deepspeed). The deepspeed launcher hands its processes devices 0..N-1 in CUDA_VISIBLE_DEVICES, which on
    a GPU machine shows them the GPUs again; there torchrun starts DeepSpeed's processes, which it runs alike."""
    bin_dir = Path(sys.executable).parent  # this environment's launchers, whatever PATH holds
    if name == "deepspeed" and not GPU_MACHINE:
        return [str(bin_dir / "deepspeed"), "--num_gpus", str(processes)]
    return [str(bin_dir / "torchrun"), "--nproc_per_node", str(processes)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a launcher's rendezvous or a server a test starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_failure(command: list[str], result: subprocess.CompletedProcess) -> tuple[int, str]:
    """The exit code of the processes `command` launched and their stderr. torchrun exits 1 whatever failed, and
    appends a report of its own (its traceback, ending in ChildFailedError, then each rank's exit code)."""
    if Path(command[0]).name != "torchrun":
        return result.returncode, result.stderr
    import re

    own, *report = re.split(r'Traceback \(most recent call last\):\n  File "[^"]*/torchrun"', result.stderr, maxsplit=1)
    codes = set(re.findall(r"exitcode\s*: (-?\d+)", "".join(report)))
    return (int(codes.pop()) if len(codes) == 1 else result.returncode), own


# One CPU thread for tests that run models: on a small shared machine, OpenMP threads spinning
# against other processes made a forward pass up to 20x slower. Results do not depend on it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_script(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command the way a user would; returns the finished process (check returncode yourself)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build_tiny_model(folder: Path, chat_template: bool = True, seed: int = 0, architecture: str = "llama") -> Path:
    """A tiny random Llama (or Qwen2: `architecture="qwen2"`; hidden 64, 2 layers) with the default model's
    tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from fora.models.load import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    if not chat_template:
        tokenizer.chat_template = None
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    config = config_class(
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
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not chat_template:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


# --- flags ---------------------------------------------------------------------------------------


def parse_flags(out, *flags):
    """train_lora.py's four argument groups parsed from `--output_dir OUT FLAGS`."""
    from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args

    return parse_args((ModelArguments, DataArguments, FinetuningArguments, TrainArguments), argv=["--output_dir", out, *flags])


def flag_error(out, *flags) -> str:
    """The one-line message of the UserError that parse_flags(out, *flags) raises."""
    import pytest

    from fora.errors import UserError

    with pytest.raises(UserError) as error:
        parse_flags(out, *flags)
    message = str(error.value)
    assert "\n" not in message
    return message


# --- data files and what they encode to ---------------------------------------------------------------

ALPACA = {"instruction": "Extract the triples.", "input": "The pump leaks.", "output": "pump_部件故障_leaks"}


def turns_of(path, **kwargs):
    """(system, turns) of each conversation load_conversations reads from `path`."""
    from fora.data.formats import load_conversations

    conversations, _ = load_conversations(str(path), **kwargs)
    return [(c.system, c.turns) for c in conversations]


def data_error(path_or_call, *args, **kwargs) -> str:
    """The message of the UserError raised by load_conversations(path) (or by a callable), checked to be one line."""
    import pytest

    from fora.data.formats import load_conversations
    from fora.errors import UserError

    call = path_or_call if callable(path_or_call) else lambda: load_conversations(str(path_or_call), *args, **kwargs)
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def masked_and_trained(tokenizer, row) -> tuple[str, str]:
    """(the masked part, the trained part) of a tokenized record, decoded."""
    from fora.data.encode import IGNORE_INDEX

    assert len(row["input_ids"]) == len(row["labels"])
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (IGNORE_INDEX, token)  # a trained label is the token itself, never shifted or padded
    masked = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
    trained = [label for label in row["labels"] if label != IGNORE_INDEX]
    return decode(tokenizer, masked), decode(tokenizer, trained)


def tokenize_file(tokenizer, path, template=None, max_source_length=512, max_target_length=512, **kwargs):
    """Every conversation of `path`, tokenized for training with `template` (default: the tokenizer's)."""
    from fora.data.encode import tokenize_conversation
    from fora.data.formats import load_conversations
    from fora.data.templates import get_template

    conversations, _ = load_conversations(str(path), **kwargs)
    template = template or get_template(tokenizer, None)
    return [
        tokenize_conversation(
            {"where": c.where, "system": c.system, "turns": c.turns}, tokenizer, template, max_source_length,
            max_target_length,
        )
        for c in conversations
    ]


def train_records(count: int, start: int = 0) -> list[dict]:
    """Records `start` .. `start + count - 1` of the project's own data/train.json."""
    import json

    lines = (REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start:start + count]]


# --- adapters and batches ----------------------------------------------------------------------------


def peft_adapter(base: Path, folder: Path, kind: str = "lora", **run_info) -> Path:
    """A saved adapter with large random weights, so it visibly changes the model, plus fora_run.json.

    (The tiny random base only repeats the last prompt token, a newline, so its predictions are empty.)
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fora.run import RunRecord
    from fora.tuners.fora import ForaConfig

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    common = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM")
    config = ForaConfig(**common) if kind == "fora" else LoraConfig(**common)
    model = get_peft_model(model, config)
    with torch.no_grad():  # large enough to outweigh the base (init std 0.02), so the base's echo of its last token goes
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    RunRecord(**{
        "base_model": str(base), "finetuning_type": kind, "torch_dtype": "float32", "quantization_bit": None,
        "trust_remote_code": False, "template": None, "max_source_length": 512, "max_target_length": 512,
        **run_info,
    }).save(folder)
    return folder



def random_batch(vocab: int, pad_id: int) -> dict:
    """Three rows of different lengths; prompts masked, answers trained, right padding."""
    import torch

    from fora.data.collator import PaddingCollator

    generator = torch.Generator().manual_seed(0)
    features = []
    for length, prompt in ((23, 15), (9, 4), (17, 6)):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return PaddingCollator(pad_id)(features)


def adapted_model(tiny_model, dtype=None):
    """The tiny model with a rank-4 LoRA adapter whose B is random (at init it is 0 and A gets no gradient)."""
    import torch

    from fora.args import FinetuningArguments
    from fora.models.load import load_model
    from fora.tuners.attach import attach_adapter

    model = load_model(str(tiny_model), dtype or torch.float32)
    torch.manual_seed(0)
    model = attach_adapter(model, FinetuningArguments(finetuning_type="lora", lora_rank=4, lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def trainer_loss_and_grads(trainer, model, batch, num_items=None):
    """The trainer's loss on `batch` and the gradients of the trainable parameters."""
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def train_script(tmp_path, model, output, *extra, script="train_lora.py"):
    """Run `script` (train_lora.py by default) on data/train.json into tmp_path/OUTPUT; (the folder, the process)."""
    import sys

    out = tmp_path / output
    result = run_script(
        sys.executable, script, "--model_name_or_path", str(model), "--train_file", "data/train.json",
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--cache_dir", str(tmp_path / "cache"), "--report_to", "none", *extra, env=ONE_THREAD,
    )
    return out, result


# The tiny model's block linears: q, k, v, o, gate, up, down in each of its 2 layers.
BLOCK_LINEARS = 7 * 2


def blocks(model):
    """The model's list of transformer blocks (its longest nn.ModuleList)."""
    from torch import nn

    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)


# --- federated -----------------------------------------------------------------------------------------

FLOWER_ENV = {**ONE_THREAD, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def random_states(count: int) -> list[dict]:
    """`count` random adapter states (three LoRA-like tensors each), seeded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shapes = {"layers.0.q_proj.lora_A.weight": (4, 16), "layers.0.q_proj.lora_B.weight": (16, 4), "layers.1.lora_A.weight": (4, 8)}
    return [{k: torch.randn(s, generator=generator) for k, s in shapes.items()} for _ in range(count)]
