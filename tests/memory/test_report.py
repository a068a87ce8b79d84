"""fora/memory/report.py (estimate_memory.py): the table and --json say the same, an argument file gives the flags'
estimate, the answer says whether it fits, the largest batch and the cheapest change, and --help names every input."""

import json
import re

import pytest

from fora.memory.decide import largest_batch
from fora.memory.device import gib, parse_size
from fora.memory.estimate import estimate, with_changes
from fora.memory.report import main

pytestmark = pytest.mark.usefixtures("keep_environment")


def flags(tiny_model, tmp_path, *extra):
    """A GPU run's flags: its framework overhead is fixed (a CPU run's is this process's resident memory, which moves)."""
    return ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "out"), "--device", "cuda",
            "--per_device_train_batch_size", "4", "--max_source_length", "64", "--max_target_length", "64", *extra]


def test_json_total_is_the_tables_total_and_the_sum_of_its_lines(tiny_model, tmp_path, capsys):
    result = main(flags(tiny_model, tmp_path, "--json", "--device_memory", "8GB"))
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and printed["total_bytes"] == sum(printed["lines"].values())
    main(flags(tiny_model, tmp_path, "--device_memory", "8GB"))
    table = capsys.readouterr().out
    total = re.search(r"^  total +([0-9.]+) GiB", table, re.M).group(1)
    assert total == gib(printed["total_bytes"])
    for name, size in printed["lines"].items():
        assert re.search(rf"^  {re.escape(name)} +{gib(size)} GiB", table, re.M), name
    assert "Fits 8.00 GiB (--device_memory): yes" in table


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_an_argument_file_gives_the_same_estimate_as_its_flags(tiny_model, tmp_path, suffix):
    values = {"model_name_or_path": str(tiny_model), "output_dir": str(tmp_path / "out"), "lora_rank": 4,
              "per_device_train_batch_size": 2, "max_source_length": 100, "max_target_length": 28, "gradient_checkpointing": True}
    path = tmp_path / f"args.{suffix}"
    path.write_text("".join(f"{key}: {value}\n" for key, value in values.items()) if suffix == "yaml" else json.dumps(values))
    # On a GPU: its framework overhead is fixed (see `flags`)
    from_file = main([str(path), "--device", "cuda", "--json", "--device_memory", "4GB"])
    from_flags = main([*(f"--{key}={value}" for key, value in values.items()), "--device", "cuda", "--json", "--device_memory", "4GB"])
    assert from_file == from_flags
    assert (from_file["run"]["batch"], from_file["run"]["length"], from_file["run"]["gradient_checkpointing"]) == (2, 128, True)


def test_a_run_too_large_gets_its_largest_batch_and_cheapest_change(tiny_model, tmp_path, run_setting):
    """At a memory between the run's estimate with and without checkpointing, forced off: it does not fit, and the
    cheapest change is checkpointing; the largest batch is the last one whose estimate fits."""
    base = run_setting("--device", "cuda", "--per_device_train_batch_size", "4", "--max_source_length", "64", "--max_target_length", "64",
                       "--gradient_checkpointing", "false")
    without, with_ = estimate(base).total, estimate(with_changes(base, checkpointing=True)).total
    memory = (without + with_) // 2
    result = main(flags(tiny_model, tmp_path, "--json", "--device_memory", str(memory), "--gradient_checkpointing", "false"))
    assert result["total_bytes"] == without and result["fits"] is False
    assert result["cheapest_change"] == {"flags": "--gradient_checkpointing true", "why": "recomputes activations in backward",
                                         "total": with_}
    batch = result["largest_batch"]
    assert batch == largest_batch(base, memory) and 1 <= batch < 4
    assert estimate(with_changes(base, batch=batch)).total <= memory < estimate(with_changes(base, batch=batch + 1)).total


def test_auto_checkpointing_is_decided_as_training_decides_it(tiny_model, tmp_path):
    roomy = main(flags(tiny_model, tmp_path, "--json", "--device_memory", "64GB"))
    assert roomy["run"]["gradient_checkpointing"] is False and roomy["run"]["gradient_checkpointing_auto"]
    tight = main(flags(tiny_model, tmp_path, "--json", "--device_memory", str(roomy["total_bytes"] - 1)))
    assert tight["run"]["gradient_checkpointing"] is True and tight["fits"] is True


def test_a_gpu_run_from_a_machine_without_one(tiny_model, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    main(["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "out"), "--device", "cuda", "--fp16"])
    table = capsys.readouterr().out
    assert "Memory per GPU:" in table and "16-bit, fp16 mixed precision" in table
    assert "Fits: unknown (no GPU on this machine: --device_memory gives the GPU's)" in table


def test_help_documents_every_input(capsys):
    """The issue's inputs: the model, method and rank, quantization, dtype, batch, lengths or the training file,
    checkpointing, DeepSpeed's file, devices, the memory to fit, JSON."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--finetuning_type", "--lora_rank", "--quantization_bit", "--torch_dtype", "--fp16",
                 "--bf16", "--per_device_train_batch_size", "--max_source_length", "--max_target_length", "--train_file",
                 "--gradient_checkpointing", "--deepspeed", "--num_devices", "--device_memory", "--device", "--qlora", "--json"):
        assert re.search(rf"^  {flag}\b", text, re.M), flag
    assert "built-in architecture" in text and "FORA_AVAILABLE_MEMORY" in text
    assert parse_size("24GB", "x") == 24 * 2**30
