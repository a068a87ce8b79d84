"""fora/run.py: the run record (fora_run.json) itself, and in every checkpoint, which loads as it was trained."""

import shutil

import pytest

from fora.errors import UserError
from fora.models.inference import load_inference_model
from fora.run import RUN_FILE, RunRecord
from support import train_script

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the record itself ----------------------------------------------------------------------------


def test_record_round_trip_is_atomic(tmp_path):
    record = RunRecord(base_model="/m", finetuning_type="fora", torch_dtype="bfloat16", quantization_bit=4, template="alpaca")
    record.save(tmp_path)
    assert RunRecord.load(tmp_path) == record
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]  # no temporary file left beside it
    assert RunRecord.load(tmp_path / "elsewhere") is None


def test_a_legacy_checkpoint_finds_its_run_one_level_up(tmp_path):
    RunRecord(base_model="/m", finetuning_type="lora", torch_dtype="float32").save(tmp_path)
    (tmp_path / "checkpoint-4").mkdir()
    assert RunRecord.load(tmp_path / "checkpoint-4").base_model == "/m"


def test_a_broken_record_is_one_line(tmp_path):
    (tmp_path / RUN_FILE).write_text('{"base_model": "/m",\n  "finetuning_type": }')
    with pytest.raises(UserError, match=rf"^{tmp_path / RUN_FILE}: line 2: invalid JSON"):
        RunRecord.load(tmp_path)
    (tmp_path / RUN_FILE).write_text('{"finetuning_type": "lora"}')
    with pytest.raises(UserError, match="field 'base_model' is missing"):
        RunRecord.load(tmp_path)


# --- every checkpoint describes itself; overwriting starts clean ------------------------------------


@pytest.mark.slow
def test_every_checkpoint_carries_the_run_record(tmp_path, tiny_model_plain):

    out, result = train_script(tmp_path, tiny_model_plain, "run", "--max_steps", "2", "--save_steps", "1", "--template", "alpaca")
    assert result.returncode == 0, result.stderr[-3000:]
    final = RunRecord.load(out)
    for step in (1, 2):
        assert RunRecord.load(out / f"checkpoint-{step}") == final
        assert (out / f"checkpoint-{step}" / RUN_FILE).is_file()
    # A checkpoint copied away from its run loads as it was trained: its template, not the tokenizer's default.
    moved = shutil.copytree(out / "checkpoint-1", tmp_path / "copied-checkpoint")
    _, _, info = load_inference_model(str(moved))
    assert info["template"] == "alpaca" and info["model_kind"] == "adapter"


@pytest.mark.slow
def test_a_qlora_checkpoint_predicts_on_its_4bit_base(tmp_path, tiny_model):
    out, result = train_script(tmp_path, tiny_model, "qlora", "--max_steps", "1", "--save_steps", "1", script="train_qlora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    moved = shutil.copytree(out / "checkpoint-1", tmp_path / "elsewhere")
    assert RunRecord.load(moved).quantization_bit == 4
    from fora.infer import predict as predict_fora

    results = predict_fora.main(["--model_dir", str(moved), "--test_path", "data/test.json", "--max_samples", "2",
                                 "--max_new_tokens", "4", "--output_dir", str(tmp_path / "pred")])
    assert results["quantization_bit"] == 4
