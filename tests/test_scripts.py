"""scripts/: the set-up and the GPU check stop in one line where CUDA is expected and missing; the methods'
comparison prints its table."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from support import REPO, run_script


def fake_gpu_server(tmp_path) -> dict:
    """PATH with an nvidia-smi that answers as a driver would: this machine looks like a GPU server."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: 12.4'\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def without_nvidia_smi() -> dict:
    """PATH without any folder holding nvidia-smi."""
    folders = [f for f in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(f, "nvidia-smi"))]
    return {"PATH": os.pathsep.join(folders)}


def test_gpu_check_stops_in_one_line_without_a_gpu():
    result = run_script("bash", "scripts/gpu_check.sh", env=without_nvidia_smi(), timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: no NVIDIA GPU on this machine (no nvidia-smi): scripts/gpu_check.sh "
                                          "checks the CUDA path; the CPU path is bash scripts/test.sh"]


def test_setup_on_a_gpu_server_keeps_torch_and_stops_when_it_sees_no_cuda(tmp_path):
    """The CPU torch of this .venv on a machine with nvidia-smi: everything would silently run on the CPU."""
    result = run_script("bash", "scripts/setup.sh", env=fake_gpu_server(tmp_path), timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: nvidia-smi is here but torch ") and "sees no CUDA device" in line


def test_setup_on_a_gpu_server_without_torch_asks_for_the_cuda_build_first(tmp_path):
    """A fresh clone on a GPU server: installing PyPI's default torch could miss the driver; the user's build comes first."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", clone / "scripts")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True)
    result = run_script("bash", "scripts/setup.sh", cwd=clone, env=fake_gpu_server(tmp_path), timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: this is a GPU server and {clone / '.venv'} has no torch: install the CUDA build")
    assert not (clone / ".venv" / ".fora-requirements.sha256").exists()  # nothing was installed


@pytest.mark.slow
def test_compare_methods_scores_the_base_and_each_method_it_is_given(tmp_path):
    """A short run of the table's script: the base row, a method that merges, one that does not."""
    from transformers import AutoConfig

    from fora.models.load import ensure_default_model

    rows_file = tmp_path / "rows.json"
    result = run_script(sys.executable, "scripts/compare_methods.py", "--methods", "base,lora r8,prefix", "--steps", "2",
                        "--records", "8", "--test_records", "2", "--json", str(rows_file),
                        env={"TMPDIR": str(tmp_path)}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads(rows_file.read_text())["rows"]}
    assert list(rows) == ["base model (not trained)", "lora r8", "prefix (P-tuning v2; 16 tokens)"]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # the header, a line per row

    config = AutoConfig.from_pretrained(ensure_default_model())
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    per_layer = 8 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inner) * 3)  # r (in + out): q, o; k, v; mlp
    assert rows["lora r8"]["trainable_parameters"] == config.num_hidden_layers * per_layer
    prefix = rows["prefix (P-tuning v2; 16 tokens)"]
    assert prefix["trainable_parameters"] == 16 * config.num_hidden_layers * 2 * kv  # a key and a value per layer
    assert rows["base model (not trained)"]["trainable_parameters"] == 0
    assert rows["lora r8"]["merge_error"] < 1e-4
    assert prefix["merge_error"] is None and rows["base model (not trained)"]["merge_error"] is None
    for row in rows.values():
        assert math.isfinite(row["eval_loss"]) and 0 <= row["rouge-l"] <= 100


def test_compare_methods_refuses_a_count_below_one_in_one_line():
    result = run_script(sys.executable, "scripts/compare_methods.py", "--test_records", "0", timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --test_records must be at least 1, got 0"]
