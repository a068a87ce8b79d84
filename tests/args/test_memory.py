"""fora/args/memory.py: estimate_memory.py's own flags, parsed with training's."""

import pytest

from fora.errors import UserError
from fora.memory.plan import parse

pytestmark = pytest.mark.usefixtures("keep_environment")


def test_defaults_and_the_qlora_run(tmp_path):
    memory, model, *_ = parse(["--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert (memory.device, memory.device_memory, memory.num_devices, memory.qlora, memory.json) == ("cpu", None, None, False, False)
    assert model.quantization_bit is None
    memory, model, _, _, training, cuda = parse(["--output_dir", str(tmp_path / "out"), "--qlora", "--device", "cuda"])
    assert memory.qlora and model.quantization_bit == 4 and cuda and training.optim == "paged_adamw_8bit"


def test_num_devices_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--num_devices must be at least 1, got 0"):
        parse(["--output_dir", str(tmp_path / "out"), "--num_devices", "0"])
