"""predict_fora.py and fora/generate.py: batched generation, every kind of --model_dir, outputs, errors."""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import ONE_THREAD, REPO, SHARED_DATA, run_script, write_jsonl

from fora.data.formats import load_conversations
from fora.errors import UserError
from fora.models.inference import load_inference_model

TEST_DATA = REPO / "data" / "test.json"


pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def first_test_records(n: int) -> list[dict]:
    return read_jsonl(TEST_DATA)[:n]


def predict(*flags: str) -> dict:
    """predict_fora.main in this process (the CLI tests below go through a real subprocess)."""
    from fora.infer import predict as predict_fora

    return predict_fora.main(list(flags))


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


# --- fora/generate.py ---------------------------------------------------------------------------


def alone(model, tokenizer, prompt: list[int], stop: list[int], budget: int, num_beams: int = 1) -> list[int]:
    """One prompt through `model.generate` by itself (no padding, no shared cache): the reference."""
    import torch

    from fora.infer import generate

    config = generate.generation_config(tokenizer, stop, num_beams=num_beams)
    config.max_new_tokens = budget
    new = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    return new[: next((k for k, token in enumerate(new) if token in stop), len(new))]


def test_batched_greedy_equals_one_at_a_time(monkeypatch):
    """Batches (shared prefix encoded once, the rest in length-sorted chunks, one cache per batch)
    give the same greedy tokens as each prompt alone, in input order, with per-record budgets, and
    each row is cut before its first stop token.

    On the embedded SmolLM2-135M-Instruct: the tiny random models repeat one token per row, which
    would make this comparison nearly vacuous; a trained model's varied tokens and realistic logit
    gaps are where padding-induced rounding could flip a token.
    """
    from fora.data.templates import get_template
    from fora.infer import generate

    model, tokenizer, _ = load_inference_model(None, None)
    template = get_template(tokenizer, None)
    conversations, _ = load_conversations(str(TEST_DATA), require_response=False)
    # Six prompts of six different lengths, so every batch is padded, and budgets of 4 to 8 tokens.
    prompts = [generate.build_prompt(tokenizer, template, c, 30 + 9 * i, 512)[0] for i, c in enumerate(conversations[:6])]
    assert len({len(p) for p in prompts}) == 6
    assert generate.takes_reserved_cache(model) and len(generate.SharedPrefix.encode(model, prompts, "cpu").ids) > 20
    budgets = [4 + (i * 3) % 5 for i in range(6)]
    stop = template.stop_token_ids(tokenizer)

    single = [alone(model, tokenizer, p, stop, b) for p, b in zip(prompts, budgets)]
    assert [len(s) for s in single] == budgets  # no EOS this early: every row spends its own budget
    assert len({t for s in single for t in s}) > 12  # varied tokens, not one repeated
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 100)  # chunks of one to three rows
    for batch_size in (1, 4, 6):
        assert generate.generate_ids(model, tokenizer, prompts, stop, budgets, batch_size, progress=False) == single

    # Stop at a token some row produces mid-answer: every row ends just before its first occurrence.
    row, k = next((r, k) for r, s in enumerate(single) for k in range(1, len(s)) if s[k] not in s[:k])
    expected = [s[: s.index(single[row][k])] if single[row][k] in s else s for s in single]
    assert expected[row] == single[row][:k]
    assert generate.generate_ids(model, tokenizer, prompts, [single[row][k]], budgets, 6, progress=False) == expected


@pytest.mark.parametrize("common", [[5, 6, 7, 8], []], ids=["shared-prefix", "no-shared-prefix"])
def test_prefill_cache_holds_what_each_prompt_computes_alone(tiny_model, monkeypatch, common):
    """Each row's columns of the batch cache ([prefix | gap | rest], every column but the last)
    hold the keys and values its prompt gives in a plain forward pass by itself."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from fora.infer import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [[100 + n, *common, *torch.randint(10, 500, (n,), generator=generator).tolist()] for n in (8, 6, 6, 2, 1)]
    if common:  # the prompts then share the common part and not the first token: put that first
        prompts = [p[1:] for p in prompts]
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 16)  # chunks of 1, 2 and 2 rows
    with torch.inference_mode():
        shared = generate.SharedPrefix.encode(model, prompts, "cpu")
        assert shared.ids == common
        input_ids, attention_mask, cache = shared.prefill(model, prompts, pad_id=0, new_tokens=4)
        width = input_ids.shape[1]
        assert width == max(map(len, prompts)) and cache.get_seq_length() == width - 1
        for row, prompt in enumerate(prompts):
            assert input_ids[row][attention_mask[row].bool()].tolist() == prompt
            reference = DynamicCache()
            model(input_ids=torch.tensor([prompt]), cache=reference, use_cache=True)
            own = attention_mask[row, : width - 1].nonzero().squeeze(-1)
            gap = (attention_mask[row, : width - 1] == 0).nonzero().squeeze(-1)
            for layer, expected in zip(cache.layers, reference.layers):
                torch.testing.assert_close(layer.keys[row][:, own], expected.keys[0, :, : len(prompt) - 1], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(layer.values[row][:, own], expected.values[0, :, : len(prompt) - 1], atol=1e-5, rtol=1e-5)
                # The gap is masked; it must still be finite (a masked NaN would poison attention).
                assert layer.keys[row][:, gap].isfinite().all() and layer.values[row][:, gap].isfinite().all()


def test_beam_search_takes_the_plain_batches(tiny_model):
    """generate() cannot widen a given cache for beams: beam search runs left-padded batches and
    still equals each prompt searched alone (equal budgets)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fora.infer import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 500, (n,), generator=generator).tolist() for n in (5, 9, 3)]
    config = generate.generation_config(tokenizer, [0], num_beams=2)
    expected = [alone(model, tokenizer, p, [0], 6, num_beams=2) for p in prompts]
    assert generate.generate_ids(model, tokenizer, prompts, [0], 6, 3, config, progress=False) == expected


def test_build_prompt_keeps_the_question_when_history_is_long(tokenizer):
    """Training's cut (fora.data.encode) drops turns that no longer fit; for prediction the turn being
    asked must stay, so the oldest turns go instead."""
    from fora.data.formats import Conversation
    from fora.data.templates import NAMED_TEMPLATES
    from fora.infer.generate import build_prompt

    template = NAMED_TEMPLATES["default"]
    history = [("old question " * 20, "old answer " * 20)] * 3
    conversation = Conversation("x", None, [*history, ("the real question?", "reference")])
    ids, cut = build_prompt(tokenizer, template, conversation, 64, 32)
    text = tokenizer.decode(ids)
    assert cut and text.endswith("Human: the real question?\n\nAssistant: ")
    assert "reference" not in text
    short, cut = build_prompt(tokenizer, template, Conversation("x", None, [("hi", None)]), 64, 32)
    assert not cut and tokenizer.decode(short) == "Human: hi\n\nAssistant: "


def prompts_as_trained_and_as_predicted(tokenizer, template, conversations, max_src_len: int):
    """Per record: the masked part of its training input, and its prediction prompt (and whether it was cut)."""
    from fora.data.encode import IGNORE_INDEX, tokenize_conversation
    from fora.infer.generate import build_prompt

    for c in conversations:
        row = tokenize_conversation({"where": c.where, "system": c.system, "turns": c.turns}, tokenizer, template,
                                    max_src_len, 512)
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        yield trained, *build_prompt(tokenizer, template, c, max_src_len, 512)


def test_long_record_is_predicted_from_a_prompt_that_ends_with_the_header(tokenizer):
    """The prompt is cut as training cut it: the end of the user's text goes, the assistant header stays."""
    from fora.data.formats import Conversation
    from fora.data.templates import get_template

    question = "Extract the triples. Text: " + "the pump leaks oil and the fan is slow; " * 40
    conversation = Conversation("x", None, [(question, "reference")])
    template = get_template(tokenizer, None)
    ((trained, ids, cut),) = prompts_as_trained_and_as_predicted(tokenizer, template, [conversation], 64)
    text = tokenizer.decode(ids)
    assert cut and len(ids) <= 64 and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Extract the triples. Text: the pump leaks oil" in text and "reference" not in text
    assert ids == trained


@pytest.mark.skipif(not (SHARED_DATA / "spo_1.json").is_file(), reason="needs the authors' data in ../shared/data")
@pytest.mark.parametrize("template_name", ["chat_template", "alpaca", "chatml", "baichuan2", "chatglm2"])
def test_every_spo_1_prompt_ends_with_the_assistant_header(tokenizer, tiny_model_plain, template_name):
    """The seed's test set at the seed's --max_src_len 512: about half the prompts are longer."""
    from fora.data.formats import load_conversations
    from fora.data.templates import NAMED_TEMPLATES, get_template
    from fora.models.tokenizer import load_tokenizer

    if template_name != "chat_template":
        tokenizer = load_tokenizer(str(tiny_model_plain))
    template = get_template(tokenizer, template_name)
    header = {
        "chat_template": "<|im_end|>\n<|im_start|>assistant\n",
        **{name: t.user.split("{content}")[1] for name, t in NAMED_TEMPLATES.items()},
    }[template_name]
    conversations, _ = load_conversations(str(SHARED_DATA / "spo_1.json"), require_response=False)
    built = list(prompts_as_trained_and_as_predicted(tokenizer, template, conversations, 512))
    assert len(built) == 50 and any(cut for _, _, cut in built)
    for conversation, (trained, ids, cut) in zip(conversations, built):
        user = conversation.turns[0][0]
        uncut = template.encode(tokenizer, None, [(user, None)])[0][0]
        assert cut == (len(uncut) > 512) and len(ids) <= 512 and ids == trained
        text = tokenizer.decode(ids, skip_special_tokens=False)
        assert text.endswith(header), conversation.where
        assert cut == (user not in text)  # only a cut record lost part of its text: its start stays
        assert user[:100] in text
        if template_name == "chat_template" and not cut:  # a prompt that fits is what the chat template renders
            messages = [{"role": "user", "content": user}]
            assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


# --- predict_fora.py: the command lines -----------------------------------------------------------


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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--test_path", "data/test.json"], "--output_dir is required"),
        (["--output_dir", "x"], "--test_path (or --dataset_dir with --dataset) is required"),
        (["--output_dir", "x", "--dataset", "nope"], "no dataset named 'nope'"),
        (["--output_dir", "x", "--test_path", "data/test.json", "--model_dir", "a,b"], "not a list"),
        (["--output_dir", "x", "--test_path", "data/test.json", "--max_len", "0"], "--max_len must be at least 1"),
        (["--output_dir", "x", "--test_path", "data/test.json", "--model_dir", "no/such/dir"], "no such folder"),
    ],
)
def test_flag_mistakes(flags, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        predict(*flags)
