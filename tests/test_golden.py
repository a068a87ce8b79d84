"""Golden runs: a fixed tiny run of every path, recorded before the code was reorganised (issue 37), which
the code must reproduce: training losses and trained tensors (LoRA, FoRA, QLoRA, full; 1 process, and 2
under deepspeed ZeRO-2 and torchrun), predictions and their scores, merged weights, one federated round.

Everything runs through the command lines users type, in float32, on the tiny model of support.py. A
tensor is compared by its norm and a fixed sample of its values, each within GOLDEN_RTOL of the recorded
one relative to the tensor's scale (its largest sampled value). Greedy predictions are compared as text.

    FORA_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py     # write tests/golden/*.json anew

Record anew only for a change that is meant to change the numbers, and say so in its commit.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import ONE_THREAD, REPO, launcher, run_script

GOLDEN = REPO / "tests" / "golden"
RECORD = os.environ.get("FORA_RECORD_GOLDEN") == "1"
GOLDEN_RTOL = 1e-6
SAMPLES = 256  # values compared per tensor
PYTHON = shutil.which("python") or "python"

pytestmark = pytest.mark.slow  # every golden run goes through the real launchers

# Plain SGD at a large rate: Adam divides each gradient by its own size, so where a gradient nearly cancels out its
# rounding (which differs between CPUs: AVX2, AVX-512) moves the update by up to 1e-4 of the weights; SGD keeps such
# differences near 1e-7, while the rate moves the adapter as far as the model's own weights.
COMMON = ["--max_steps", "3", "--optim", "sgd", "--learning_rate", "1.0", "--torch_dtype", "float32", "--logging_steps", "1",
          "--save_steps", "3", "--report_to", "none", "--seed", "42", "--lora_rank", "4"]
TRAINING = {  # name: launcher and flags; every run trains on global batches of 2 records
    "lora": [PYTHON, "train_lora.py", "--per_device_train_batch_size", "2"],
    "fora": [PYTHON, "train_lora.py", "--per_device_train_batch_size", "2", "--finetuning_type", "fora"],
    "qlora": [PYTHON, "train_qlora.py", "--per_device_train_batch_size", "2"],
    "full": [PYTHON, "train_lora.py", "--per_device_train_batch_size", "2", "--finetuning_type", "full"],
    "lora_deepspeed_2": [*launcher("deepspeed", 2), "train_lora.py", "--per_device_train_batch_size", "1",
                         "--deepspeed", "ds_config.json"],
    "lora_torchrun_2": [*launcher("torchrun", 2), "train_lora.py", "--per_device_train_batch_size", "1"],
}


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict:
    """Shape, norm and SAMPLES values at fixed positions of every tensor."""
    prints = {}
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().float().flatten()
        positions = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLES]
        prints[name] = {"shape": list(tensor.shape), "norm": flat.double().norm().item(), "samples": flat[positions].tolist()}
    return prints


def assert_same_fingerprint(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensor names differ"
    for name, expected in want.items():
        actual = got[name]
        assert actual["shape"] == expected["shape"], f"{what}: {name} shape"
        scale = max(max(map(abs, expected["samples"]), default=0.0), 1e-12)
        assert abs(actual["norm"] - expected["norm"]) <= GOLDEN_RTOL * max(expected["norm"], 1e-12), f"{what}: {name} norm"
        worst = max((abs(a - b) for a, b in zip(actual["samples"], expected["samples"])), default=0.0)
        assert worst <= GOLDEN_RTOL * scale, f"{what}: {name} differs by {worst / scale:.2e} of its scale"


def assert_close_numbers(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ"
    for key, expected in want.items():
        actual = got[key]
        if isinstance(expected, float):
            assert abs(actual - expected) <= GOLDEN_RTOL * max(abs(expected), 1e-12), f"{what}: {key} {actual} != {expected}"
        else:
            assert actual == expected, f"{what}: {key}"


def check(name: str, observed: dict) -> None:
    """Compare `observed` with tests/golden/NAME.json (or write it, when recording)."""
    path = GOLDEN / f"{name}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(observed, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    golden = json.loads(path.read_text(encoding="utf-8"))
    assert sorted(observed) == sorted(golden), f"{name}: parts differ"
    for part, value in golden.items():
        if part == "tensors":
            assert_same_fingerprint(observed[part], value, name)
        elif isinstance(value, dict):
            assert_close_numbers(observed[part], value, f"{name}: {part}")
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert all(abs(a - b) <= GOLDEN_RTOL * max(abs(b), 1e-12) for a, b in zip(observed[part], value, strict=True)), \
                f"{name}: {part} {observed[part]} != {value}"
        else:
            assert observed[part] == value, f"{name}: {part}"


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> dict[str, Path]:
    """The first 16 training and 8 test records of data/ (the project's own sample data)."""
    folder = tmp_path_factory.mktemp("golden-data")
    files = {}
    for name, count in (("train", 16), ("test", 8)):
        lines = (REPO / "data" / f"{name}.json").read_text(encoding="utf-8").splitlines(True)[:count]
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(lines), encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def trained(tiny_model, golden_data, tmp_path_factory):
    """Train the run NAME once per session; returns its output folder."""
    folder = tmp_path_factory.mktemp("golden-runs")
    done: dict[str, Path] = {}

    def train(name: str) -> Path:
        if name not in done:
            out = folder / name
            result = run_script(
                *TRAINING[name], "--model_name_or_path", str(tiny_model), "--train_file", str(golden_data["train"]),
                "--output_dir", str(out), "--cache_dir", str(folder / "cache"), *COMMON, env=ONE_THREAD, timeout=900,
            )
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
            done[name] = out
        return done[name]

    return train


@pytest.mark.parametrize("name", list(TRAINING))
def test_training_reproduces_its_golden_run(name, trained):
    out = trained(name)
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    weights = out / ("model.safetensors" if name == "full" else "adapter_model.safetensors")
    check(f"train_{name}", {
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "tensors": fingerprint(load_file(str(weights))),
    })


DECODING = {  # the tiny random model's greedy answer is line breaks; sampling gives varied text to compare
    "greedy": [],
    "sampled": ["--do_sample", "--temperature", "1.0", "--top_p", "1.0", "--seed", "7"],
}


@pytest.mark.parametrize("decoding", list(DECODING))
@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_prediction_reproduces_its_golden_run(name, decoding, trained, golden_data, tmp_path):
    out = tmp_path / "predict"
    result = run_script(
        PYTHON, "predict_fora.py", "--model_dir", str(trained(name)), "--test_path", str(golden_data["test"]),
        "--output_dir", str(out), "--max_new_tokens", "12", "--batch_size", "4", *DECODING[decoding], env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    results = json.loads((out / "predict_results.json").read_text())
    scores = {key: value for key, value in results.items() if key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "scored")}
    check(f"predict_{name}_{decoding}", {"prompts": [r["prompt"] for r in rows], "predictions": [r["predict"] for r in rows],
                              "scores": scores})


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merge_reproduces_its_golden_run(name, trained, tmp_path):
    out = tmp_path / "merged"
    result = run_script(PYTHON, "merge_lora.py", "--adapter", str(trained(name)), "--output_dir", str(out), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    check(f"merge_{name}", {"tensors": fingerprint(tensors)})


def test_one_federated_round_reproduces_its_golden_run(tiny_model, golden_data, tmp_path):
    out = tmp_path / "federated"
    result = run_script(
        PYTHON, "train_federated.py", "--model_name_or_path", str(tiny_model), "--train_file", str(golden_data["train"]),
        "--validation_file", str(golden_data["test"]), "--output_dir", str(out), "--num_clients", "2", "--num_rounds", "1",
        "--local_steps", "2", "--per_device_train_batch_size", "2", "--optim", "sgd", "--learning_rate", "1.0",
        "--torch_dtype", "float32",
        "--lora_rank", "4", "--report_to", "none", "--seed", "42", "--cache_dir", str(tmp_path / "cache"),
        env=ONE_THREAD, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    history = json.loads((out / "federated_history.json").read_text())
    check("federated_round", {
        "eval_losses": [entry["eval_loss"] for entry in history["rounds"]],
        "client_losses": [client["train_loss"] for entry in history["rounds"] for client in entry.get("clients", [])],
        "tensors": fingerprint(load_file(str(out / "round-1" / "adapter_model.safetensors"))),
    })
