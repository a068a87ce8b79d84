"""fora/run.py: the run record in every checkpoint, the dtype rules, and what follows from them
(faithful prediction in half precision, overwriting a run, the automatic batch size and precision)."""

import json
import shutil
import sys

import pytest
import torch
from conftest import ONE_THREAD, run_script, write_jsonl

from fora import precision
from fora.errors import UserError
from fora.models.inference import load_inference_model
from fora.run import RUN_FILE, RunRecord

pytestmark = pytest.mark.usefixtures("one_thread")


def train(tmp_path, model, output, *extra, script="train_lora.py"):
    out = tmp_path / output
    result = run_script(
        sys.executable, script, "--model_name_or_path", str(model), "--train_file", "data/train.json",
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--cache_dir", str(tmp_path / "cache"), "--report_to", "none", *extra, env=ONE_THREAD,
    )
    return out, result


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


def test_every_checkpoint_carries_the_run_record(tmp_path, tiny_model_plain):

    out, result = train(tmp_path, tiny_model_plain, "run", "--max_steps", "2", "--save_steps", "1", "--template", "alpaca")
    assert result.returncode == 0, result.stderr[-3000:]
    final = RunRecord.load(out)
    for step in (1, 2):
        assert RunRecord.load(out / f"checkpoint-{step}") == final
        assert (out / f"checkpoint-{step}" / RUN_FILE).is_file()
    # A checkpoint copied away from its run loads as it was trained: its template, not the tokenizer's default.
    moved = shutil.copytree(out / "checkpoint-1", tmp_path / "copied-checkpoint")
    _, _, info = load_inference_model(str(moved))
    assert info["template"] == "alpaca" and info["model_kind"] == "adapter"


def test_a_qlora_checkpoint_predicts_on_its_4bit_base(tmp_path, tiny_model):
    out, result = train(tmp_path, tiny_model, "qlora", "--max_steps", "1", "--save_steps", "1", script="train_qlora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    moved = shutil.copytree(out / "checkpoint-1", tmp_path / "elsewhere")
    assert RunRecord.load(moved).quantization_bit == 4
    from fora.infer import predict as predict_fora

    results = predict_fora.main(["--model_dir", str(moved), "--test_path", "data/test.json", "--max_samples", "2",
                                 "--max_new_tokens", "4", "--output_dir", str(tmp_path / "pred")])
    assert results["quantization_bit"] == 4


def test_overwrite_output_dir_removes_the_previous_runs_checkpoints(tmp_path, tiny_model):
    out, first = train(tmp_path, tiny_model, "run", "--max_steps", "3", "--save_steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # A typo in the new run's flags loses nothing: the old run is removed only once data and model have loaded.
    _, typo = train(tmp_path, tiny_model, "run", "--max_steps", "1", "--overwrite_output_dir", "--train_file", "nope.json")
    assert typo.returncode == 2 and len(list(out.glob("checkpoint-*"))) == 3

    removable = 3 + (out / "runs").is_dir()  # the checkpoints and the TensorBoard folder, if any
    adapter = (out / "adapter_model.safetensors").read_bytes()
    _, second = train(tmp_path, tiny_model, "run", "--max_steps", "1", "--save_steps", "1", "--overwrite_output_dir",
                      "--save_total_limit", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1
    assert f"removed {removable} checkpoints and logs of the previous run" in second.stdout
    assert (out / "adapter_model.safetensors").read_bytes() != adapter  # replaced by the new run's, whole


# --- prediction scores the model that was trained -----------------------------------------------------


def trained_like_adapter(base, folder, dtype: str):
    """A LoRA adapter whose factors are all non-zero (std 0.5), as after training, with its run record."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    RunRecord(base_model=str(base), finetuning_type="lora", torch_dtype=dtype).save(folder)
    return folder


def test_half_precision_prediction_keeps_the_adapter_unmerged(tmp_path, tiny_model, monkeypatch):
    """In bf16 the logits prediction decodes from are the unmerged PeftModel's, bit for bit; merged bf16
    weights would round much of dW away. In float32 the adapter is merged (same outputs up to rounding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # bf16 is emulated on CPUs without it: slow, still exact
    adapter = trained_like_adapter(tiny_model, tmp_path / "adapter", "bfloat16")
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    model, _, info = load_inference_model(str(adapter))
    assert info["torch_dtype"] == "bfloat16" and not info["merged"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        merged = reference.merge_and_unload()(ids).logits
        assert not torch.equal(merged, model(ids).logits)  # what merging in bf16 would have scored

    model32, _, info32 = load_inference_model(str(adapter), torch_dtype="float32")
    assert info32["merged"]
    unmerged32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(model32(ids).logits, unmerged32(ids).logits, rtol=1e-5, atol=1e-5)


# --- the automatic batch size -------------------------------------------------------------------------


def test_batch_size_halves_on_out_of_memory(tmp_path, tiny_model, monkeypatch, capsys):
    from fora.infer import generate
    from fora.infer import predict as predict_fora

    flags = ["--ori_model_dir", str(tiny_model), "--test_path", "data/test.json", "--max_samples", "12",
             "--max_new_tokens", "4"]
    predict_fora.main([*flags, "--batch_size", "3", "--output_dir", str(tmp_path / "fixed")])
    real_generate_ids, tried = generate.generate_ids, []

    def small_memory(model, tokenizer, prompts, stop, budgets, batch_size, *args, **kwargs):
        tried.append(batch_size)
        if batch_size > 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_generate_ids(model, tokenizer, prompts, stop, budgets, batch_size, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_ids", small_memory)
    auto = predict_fora.main([*flags, "--output_dir", str(tmp_path / "auto")])
    assert tried == [12, 6, 3] and auto["generation"]["batch_size"] == 3
    assert "out of memory at --batch_size 12; trying 6" in capsys.readouterr().err
    read = lambda name: (tmp_path / name / "generated_predictions.jsonl").read_text()  # noqa: E731
    assert read("auto") == read("fixed")


# --- precision chosen for the machine -------------------------------------------------------------------


def test_native_bf16_is_chosen_when_no_precision_is_given(tmp_path, monkeypatch, capsys):
    from fora import precision
    from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    types = (ModelArguments, DataArguments, FinetuningArguments, TrainArguments)
    model, _, _, training = parse_args(types, ["--output_dir", str(tmp_path)])
    assert training.bf16 and training.precision.mixed == "bf16" and training.precision.chosen
    assert training.precision.torch_dtype == torch.bfloat16 and model.torch_dtype == "bfloat16"
    training.precision.report()
    assert "Precision: --bf16" in capsys.readouterr().out
    model, _, _, training = parse_args(types, ["--output_dir", str(tmp_path), "--torch_dtype", "float32"])
    assert not training.bf16 and training.precision.torch_dtype == torch.float32

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    model, _, _, training = parse_args(types, ["--output_dir", str(tmp_path)])
    assert not training.bf16 and training.precision.torch_dtype == torch.float32


def test_train_and_predict_print_no_deprecation_warning(tmp_path, tiny_model):
    out, trained = train(tmp_path, tiny_model, "run", "--max_steps", "1", "--save_strategy", "no")
    assert trained.returncode == 0, trained.stderr[-3000:]
    predicted = run_script(sys.executable, "predict_fora.py", "--model_dir", str(out), "--test_path", "data/test.json",
                           "--max_samples", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "pred"),
                           env=ONE_THREAD)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    for result in (trained, predicted):
        assert "deprecated" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr[-3000:]


# --- a test split is not training data ----------------------------------------------------------------


def test_mostly_empty_responses_stop_training(tmp_path, tiny_model):
    records = [{"input": f"病历{i}", "target": ""} for i in range(8)] + [{"input": "x", "target": "y"}]
    data = write_jsonl(tmp_path / "test.json", records)
    _, result = train(tmp_path, tiny_model, "run", "--max_steps", "1", "--train_file", str(data))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {data}: 8 of 9 records have an empty response (a test split without references?); training on "
        "them teaches the model to answer nothing: pass --empty_response skip or error, or other data"
    )
    _, skipped = train(tmp_path, tiny_model, "run", "--max_steps", "1", "--train_file", str(data),
                       "--empty_response", "skip", "--save_strategy", "no")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "8 records have an empty response: left out" in skipped.stdout

