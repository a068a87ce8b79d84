"""fora/infer/predict.py (predict_fora.py): every kind of --model_dir, outputs and scores, the automatic batch size, errors."""

import json
import shutil
from pathlib import Path

import pytest

from fora.data.formats import load_conversations
from fora.errors import UserError
from fora.models.inference import load_inference_model
from support import ONE_THREAD, REPO, peft_adapter, run_script, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


TEST_DATA = REPO / "data" / "test.json"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def first_test_records(n: int) -> list[dict]:
    return read_jsonl(TEST_DATA)[:n]


def predict(*flags: str) -> dict:
    """predict_fora.main in this process (the CLI tests below go through a real subprocess)."""
    from fora.infer import predict as predict_fora

    return predict_fora.main(list(flags))


@pytest.fixture(scope="module")
def trained_lora(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter made by the real training script (2 steps)."""
    out = tmp_path_factory.mktemp("trained-lora")
    result = run_script(
        "python", "train_lora.py", "--model_name_or_path", str(tiny_model), "--train_file", "data/train.json",
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_strategy", "no", env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# --- predict_fora.py: the command lines -----------------------------------------------------------


@pytest.mark.slow
def test_seed_command_line(trained_lora, tiny_model, tmp_path):
    """The seed's form, predictions written into the adapter folder; --max_len caps prompt + answer."""
    adapter = Path(shutil.copytree(trained_lora, tmp_path / "out"))
    records = read_jsonl(REPO / "data" / "test.json")[:3]
    test_path = write_jsonl(tmp_path / "spo_1.json", records)
    result = run_script(
        "python", "predict_fora.py", "--ori_model_dir", str(tiny_model),
        "--model_dir", str(adapter), "--test_path", str(test_path), "--output_dir", str(adapter),
        "--max_len", "40", "--max_src_len", "32",
        env={"CUDA_VISIBLE_DEVICES": "0", **ONE_THREAD},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = read_jsonl(adapter / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == [r["output"] for r in records]
    assert all(set(p) == {"prompt", "predict", "label"} for p in predictions)
    results = json.loads((adapter / "predict_results.json").read_text())
    assert results["scored"] == results["total"] == 3
    assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "predict_runtime", "predict_samples_per_second"} <= set(results)
    assert results["model_kind"] == "adapter" and results["finetuning_type"] == "lora"
    # Every sample prompt is longer than 32 tokens: cut to 32, leaving 40 - 32 = 8 tokens to generate.
    assert results["prompts_truncated"] == 3 and results["generated_tokens"] <= 3 * 8
    assert all(p["prompt"].endswith("<|im_start|>assistant\n") for p in predictions)  # the text was cut, not the header
    assert "ROUGE-1" in result.stdout and "BLEU-4" in result.stdout and "Scored 3 of 3" in result.stdout
    assert "Generating" in result.stderr  # the progress bar
    assert "fewer than 512 new tokens" in result.stderr  # --max_len leaves less room than training's answers


def test_dataset_registry_and_llama_factory_flags(tiny_model, tmp_path):
    out = tmp_path / "eval"
    results = predict(
        "--do_eval", "--predict_with_generate", "--model_name_or_path", str(tiny_model),
        "--dataset_dir", "data", "--dataset", "fault_triples_test", "--max_samples", "3",
        "--per_device_eval_batch_size", "2", "--padding_side", "left", "--max_new_tokens", "8",
        "--do_sample", "--temperature", "0.7", "--top_p", "0.9", "--output_dir", str(out),
    )
    predictions = read_jsonl(out / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == [r["output"] for r in first_test_records(3)]
    assert results["model_kind"] == "base" and results["generation"]["batch_size"] == 2
    assert results["generation"]["do_sample"] and results["generation"]["temperature"] == 0.7
    assert results["test_path"] == str(Path("data") / "test.json")


@pytest.mark.slow
def test_bad_record_fails_with_file_and_line(tiny_model, tmp_path):
    records = first_test_records(3)
    records[1] = {**records[1], "input": 5}
    test_path = write_jsonl(tmp_path / "bad.json", records)
    out = tmp_path / "never"
    result = run_script(
        "python", "predict_fora.py", "--ori_model_dir", str(tiny_model), "--test_path", str(test_path),
        "--output_dir", str(out), "--max_new_tokens", "8", env=ONE_THREAD,
    )
    assert result.returncode == 2
    assert f"error: {test_path}: line 2: field 'input' must be a string" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_never_overwrites_earlier_predictions(tiny_model, tmp_path):
    flags = ["--ori_model_dir", str(tiny_model), "--test_path", str(TEST_DATA), "--max_samples", "2",
             "--max_new_tokens", "4"]
    for name in ("generated_predictions.jsonl", "predict_results.json"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("earlier run\n")
        with pytest.raises(UserError, match=f"holds an earlier run \\({name}\\).*--overwrite_output_dir"):
            predict(*flags, "--output_dir", str(out))
        assert (out / name).read_text() == "earlier run\n"
        assert sorted(p.name for p in out.iterdir()) == [name]
    predict(*flags, "--output_dir", str(out), "--overwrite_output_dir")
    assert json.loads((out / "predict_results.json").read_text())["total"] == 2
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporary files


def test_records_without_reference_are_predicted_not_scored(tiny_model, tmp_path, capsys):
    records = first_test_records(3)
    del records[1]["output"]
    test_path = write_jsonl(tmp_path / "partial.json", records)
    results = predict("--ori_model_dir", str(tiny_model), "--test_path", str(test_path), "--output_dir", str(tmp_path),
                      "--max_new_tokens", "6", "--num_beams", "2", "--padding_side", "right")
    predictions = read_jsonl(tmp_path / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == [records[0]["output"], None, records[2]["output"]]
    assert all(p["predict"] is not None for p in predictions)
    assert results["scored"] == 2 and results["total"] == 3 and "rouge-1" in results
    out = capsys.readouterr().out
    assert "Scored 2 of 3 records (1 have no reference" in out
    assert "--padding_side right applies to training only" in out


# --- predict_fora.py: every kind of --model_dir ---------------------------------------------------


def test_lora_adapter_and_its_merged_folder_agree(tiny_model, tmp_path):
    """An adapter and the model merged from it predict the same, and not what the base predicts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = peft_adapter(tiny_model, tmp_path / "lora")
    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(merged)

    flags = ["--test_path", str(TEST_DATA), "--max_samples", "4", "--max_new_tokens", "8"]
    outputs = {}
    for name, model_flags in {
        "adapter": ["--model_dir", str(adapter)],
        "merged": ["--model_dir", str(merged)],
        "base": ["--ori_model_dir", str(tiny_model)],
    }.items():
        results = predict(*flags, *model_flags, "--output_dir", str(tmp_path / f"out-{name}"))
        assert results["model_kind"] == {"adapter": "adapter", "merged": "model", "base": "base"}[name]
        outputs[name] = [p["predict"] for p in read_jsonl(tmp_path / f"out-{name}" / "generated_predictions.jsonl")]
    assert outputs["adapter"] == outputs["merged"] != outputs["base"]


def test_fora_adapter_with_recorded_template(tiny_model_plain, tmp_path):
    """A FoRA adapter: its base and template come from fora_run.json; merging for speed changes nothing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fora.data.templates import get_template
    from fora.infer import generate
    from fora.tuners.fora import load_fora_config

    adapter = peft_adapter(tiny_model_plain, tmp_path / "fora", kind="fora", template="alpaca")
    results = predict("--checkpoint_dir", str(adapter), "--test_path", str(TEST_DATA), "--max_samples", "4",
                      "--max_new_tokens", "8", "--output_dir", str(tmp_path / "out"))
    assert results["finetuning_type"] == "fora" and results["template"] == "alpaca"
    predictions = read_jsonl(tmp_path / "out" / "generated_predictions.jsonl")
    assert all(p["prompt"].rstrip().endswith("### Response:") for p in predictions)

    # The same prompts through the unmerged PEFT model give the same tokens.
    _, tokenizer, _ = load_inference_model(str(adapter))
    template = get_template(tokenizer, "alpaca")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_plain)
    unmerged = PeftModel.from_pretrained(base, adapter, config=load_fora_config(adapter)).eval()
    conversations, _ = load_conversations(str(TEST_DATA), require_response=False)
    prompts = [generate.build_prompt(tokenizer, template, c, 512, 512)[0] for c in conversations[:4]]
    new_ids = generate.generate_ids(unmerged, tokenizer, prompts, template.stop_token_ids(tokenizer), 8, progress=False)
    texts = [generate.decode(tokenizer, ids) for ids in new_ids]
    assert texts == [p["predict"] for p in predictions]


def test_qlora_adapter_loads_its_base_in_4bit(tiny_model, tmp_path):

    adapter = peft_adapter(tiny_model, tmp_path / "qlora", quantization_bit=4)
    model, _, info = load_inference_model(str(adapter))
    assert info["quantization_bit"] == 4
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    results = predict("--model_dir", str(adapter), "--test_path", str(TEST_DATA), "--max_samples", "2",
                      "--max_new_tokens", "6", "--output_dir", str(tmp_path / "out"))
    assert results["quantization_bit"] == 4 and results["total"] == 2


def test_default_model_when_no_model_is_given(tmp_path):
    from fora.models.load import DEFAULT_MODEL_DIR

    results = predict("--test_path", str(TEST_DATA), "--max_samples", "2", "--max_new_tokens", "4",
                      "--max_src_len", "64", "--output_dir", str(tmp_path))
    assert results["model_kind"] == "base" and results["base_model"] == str(DEFAULT_MODEL_DIR)
    assert len(read_jsonl(tmp_path / "generated_predictions.jsonl")) == 2


# --- the automatic batch size -------------------------------------------------------------------------


def test_batch_size_halves_on_out_of_memory(tmp_path, tiny_model, monkeypatch, capsys):
    """An allocation failure (the CPU allocator's, cuBLAS's) halves the automatic batch; the batches done before
    it are kept, and the prompts not yet done go on at the smaller size: the outputs equal a fixed batch's."""
    from transformers import GenerationMixin

    from fora.infer import predict as predict_fora

    flags = ["--ori_model_dir", str(tiny_model), "--test_path", "data/test.json", "--max_samples", "12",
             "--max_new_tokens", "4", "--torch_dtype", "float32"]
    predict_fora.main([*flags, "--batch_size", "3", "--output_dir", str(tmp_path / "fixed")])
    real_generate, batches = GenerationMixin.generate, []
    failures = iter(["[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory",
                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])

    def small_memory(self, *args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        batches.append(rows)
        if rows > 3:
            raise RuntimeError(next(failures))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", small_memory)
    auto = predict_fora.main([*flags, "--output_dir", str(tmp_path / "auto")])
    assert batches == [12, 6, 3, 3, 3, 3] and auto["generation"]["batch_size"] == 3
    errors = capsys.readouterr().err
    assert "out of memory at --batch_size 12; the remaining prompts at 6" in errors and "at --batch_size 6" in errors
    read = lambda name: (tmp_path / name / "generated_predictions.jsonl").read_text()  # noqa: E731
    assert read("auto") == read("fixed")


def test_a_late_out_of_memory_redoes_only_the_prompts_left(tiny_model, monkeypatch):
    """Memory that runs out at the third batch halves the batch from there on: the first two batches' prompts are
    generated once, not again."""
    import torch
    from transformers import GenerationMixin

    from fora.infer import generate
    from fora.models.load import load_model
    from fora.models.tokenizer import load_tokenizer

    model, tokenizer = load_model(str(tiny_model), torch.float32).eval(), load_tokenizer(str(tiny_model), padding_side="left")
    prompts = [[1, 50 + i, 60 + i, 70 + i] + [80] * (i % 3) for i in range(8)]
    real_generate, batches, calls = GenerationMixin.generate, [], []

    def late_failure(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", late_failure)
    shrunk = generate.generate_ids(model, tokenizer, prompts, [2], 3, 2, progress=False, on_shrink=lambda old, new: batches.append(new))
    assert calls == [2, 2, 2, 1, 1, 1, 1] and batches == [1]
    monkeypatch.setattr(GenerationMixin, "generate", real_generate)
    assert shrunk == generate.generate_ids(model, tokenizer, prompts, [2], 3, 1, progress=False)
    with pytest.raises(RuntimeError, match="shape"):  # not an allocation failure: raised as it is
        monkeypatch.setattr(GenerationMixin, "generate", lambda self, **kwargs: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
        generate.generate_ids(model, tokenizer, prompts, [2], 3, 2, progress=False, on_shrink=lambda old, new: None)


def test_out_of_memory_at_a_fixed_batch_size_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    """A fixed --batch_size that runs out of memory (injected: CUDA's error) ends predict_fora.py's door with exit code 2
    and one line: the estimate of generating that batch, the memory there was (FORA_AVAILABLE_MEMORY), a batch that fits."""
    import re
    import sys

    import torch
    from transformers import GenerationMixin

    from fora import cli

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GenerationMixin, "generate", no_memory)
    monkeypatch.setenv("FORA_AVAILABLE_MEMORY", "4MB")
    monkeypatch.setattr(sys, "argv", ["predict_fora.py", "--ori_model_dir", str(tiny_model), "--test_path", "data/test.json",
                                      "--max_samples", "4", "--max_new_tokens", "4", "--batch_size", "4",
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stopped:
        cli.predict()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(error) == 1
    assert re.fullmatch(r"error: out of memory while generating at --batch_size 4 \(prompts up to \d+ tokens, 4 new\): the estimate "
                        r"is [0-9.]+ GiB and FORA_AVAILABLE_MEMORY=4MB was [0-9.]+ GiB; try --batch_size [1-3] \([0-9.]+ GiB\)",
                        error[0]), error[0]
    assert not (tmp_path / "out" / "generated_predictions.jsonl").exists()
