"""scripts/*.sh: the set-up and the GPU check stop in one line where CUDA is expected and missing."""

import os
import shutil
import subprocess
import sys

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
