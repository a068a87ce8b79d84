"""The catalogue of bad inputs: each mistake a user can make, run through the real entry point.

Every case runs train_lora.py, predict_fora.py or merge_lora.py the way the script does
(`exit_on_user_error(lambda: main(argv))`, in this process to save the 6-8 s of imports a
subprocess costs) and checks that the run stops with exit code 2, exactly one `error:` line on
stderr naming the file and the line or record and the field, or the flag, and no traceback; and,
where something was saved before, that it is unchanged. A few cases run as real subprocesses to
prove the same end to end. The inputs the catalogue accepts on purpose (a UTF-8 BOM, a null input,
a test set without references) are here too, and must succeed.

The data checks themselves are unit-tested in tests/data/; this file is about what a user sees.
"""

import ast
import json
import shutil
import subprocess
import sys

import pytest

from fora import merge as merge_lora
from fora.args import MergeArguments, ModelArguments, PredictArguments, parse_args
from fora.errors import exit_on_user_error
from fora.infer import predict as predict_fora
from fora.train import recipe as train_lora
from support import ONE_THREAD, REPO, run_script, write_jsonl

ALPACA = {"instruction": "Extract the triples.", "input": "The pump leaks.", "output": "pump_部件故障_leaks"}
# A JSON array whose line 3 lacks a comma.
MALFORMED_ARRAY = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def keep_environment(monkeypatch):
    # TrainArguments exports TENSORBOARD_LOGGING_DIR; restore it after each test.
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


def lines(*records) -> str:
    """JSON Lines text of `records`."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def the_error_line(stdout: str, stderr: str) -> str:
    """The one `error:` line of a stopped run, checked to be alone and without a traceback anywhere."""
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def error_line(capsys, script, *argv) -> str:
    """Run `script` as its entry point does, in this process; it must stop with exit code 2 and one error line."""
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(lambda: script.main([str(a) for a in argv]))
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    return the_error_line(captured.out, captured.err)


def script_error_line(script: str, *argv) -> str:
    """Run `script` as a real subprocess; it must exit with code 2 and print one error line, and it must be the last."""
    result = run_script(sys.executable, script, *map(str, argv), env=ONE_THREAD)
    assert result.returncode == 2, result.stderr[-3000:]
    line = the_error_line(result.stdout, result.stderr)
    assert result.stderr.rstrip().endswith(line)
    return line


# --- train_lora.py ---------------------------------------------------------------------------------


@pytest.fixture
def previous_run(tmp_path):
    """An output folder holding an earlier run; the cases pass --overwrite_output_dir, and it must survive them."""
    folder = tmp_path / "previous-run"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"earlier weights")
    (folder / "fora_run.json").write_text('{"base_model": "earlier"}')
    return folder


@pytest.fixture
def train(capsys, tmp_path, tiny_model, previous_run):
    """train(*flags) -> the error line of train_lora.py on good data and the tiny model, `flags` overriding them."""
    good_data = write_jsonl(tmp_path / "good.json", [ALPACA, ALPACA])

    def run(*flags) -> str:
        before = snapshot(previous_run)
        line = error_line(
            capsys, train_lora,
            "--model_name_or_path", tiny_model, "--train_file", good_data, "--output_dir", previous_run,
            "--overwrite_output_dir", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--cache_dir", tmp_path / "cache", *flags,
        )
        assert snapshot(previous_run) == before
        return line

    return run


@pytest.mark.parametrize(
    "name, content, flags, message",
    [
        pytest.param(
            "array.json", MALFORMED_ARRAY, [],
            "line 3: invalid JSON (Expecting ',' delimiter, column 23)", id="malformed JSON at line 3",
        ),
        pytest.param(
            "lines.jsonl", lines(ALPACA, ALPACA) + '{"instruction": "x", "output": }\n', [],
            "line 3: invalid JSON (Expecting value, column 32)", id="JSON Lines with one bad line",
        ),
        pytest.param(
            "list.json", lines(ALPACA, ["Extract the triples.", "The pump leaks."]), [],
            "line 2: the record is a list, expected an object", id="a record that is a list",
        ),
        pytest.param(
            "missing.json", lines(ALPACA, {"instruction": "x", "input": "y"}), [],
            "line 2: field 'output' is missing", id="missing response",
        ),
        pytest.param(
            "empty-output.json", lines(ALPACA, {**ALPACA, "output": ""}), ["--empty_response", "error"],
            "line 2: field 'output' is empty (pass --empty_response train or skip to accept such records)",
            id="empty response with --empty_response error",
        ),
        pytest.param(
            "number.json", lines(ALPACA, {**ALPACA, "input": 42}), [],
            "line 2: field 'input' must be a string, got number", id="a number as input",
        ),
        pytest.param(
            "list-output.json", json.dumps([ALPACA, {**ALPACA, "output": ["pump", "leaks"]}]), [],
            "record 2: field 'output' must be a string, got list", id="a list as output, in a JSON array",
        ),
        pytest.param(
            "data.json", lines(ALPACA), ["--prompt_column", "question"],
            "column 'question' given by --prompt_column is in no record", id="unknown --prompt_column",
        ),
        pytest.param("empty.json", "", [], "the file is empty", id="empty file"),
        pytest.param("empty-array.json", "[]", [], "the JSON array is empty", id="empty JSON array"),
    ],
)
def test_bad_training_data(train, tmp_path, name, content, flags, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert train("--train_file", path, *flags) == f"error: {path}: {message}"


def test_gbk_encoded_data(train, tmp_path):
    path = tmp_path / "gbk.json"
    record = json.dumps({**ALPACA, "input": "发动机水温高"}, ensure_ascii=False)
    path.write_bytes(lines(ALPACA).encode("utf-8") + record.encode("gbk") + b"\n")
    first_gbk_byte = len(lines(ALPACA).encode("utf-8")) + record.index("发")
    assert train("--train_file", path) == (
        f"error: {path}: line 2: not valid UTF-8 (byte {first_gbk_byte}); convert it first, e.g. iconv -f GBK -t UTF-8"
    )


def test_a_directory_given_as_the_data_file(train, tmp_path):
    assert train("--train_file", tmp_path) == f"error: {tmp_path}: is a directory, expected a JSON or JSON Lines file"


def read_nothing(tmp_path) -> list[str]:
    """A model and a data file that do not exist: a flag's own error line shows it was checked before either is read."""
    return ["--model_name_or_path", tmp_path / "no-model", "--train_file", tmp_path / "no-data.json"]


BAD_TRAINING_FLAGS = [
    (["--max_source_length", "0"], "--max_source_length must be at least 1, got 0"),
    (["--learning_rate", "-1"], "--learning_rate must not be negative, got -1.0"),
    (["--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
    (["--lora_rank", "eight"], "argument --lora_rank/--lora-rank: invalid int value: 'eight'"),
    (["--lora_ranks", "8"], "unknown argument(s): --lora_ranks 8 (see --help for the flags)"),
    (["--finetuning_type", "dora"],
     "argument --finetuning_type/--finetuning-type: invalid choice: 'dora' (choose from "
         "'lora', 'fora', 'loha', 'lokr', 'ia3', 'adalora', 'oft', 'prefix', 'prompt', 'freeze', 'full')"),
    (
        ["--template", "qwen3"],
        "argument --template: invalid choice: 'qwen3' (choose from 'auto', 'chat_template', 'default', 'empty', 'alpaca', "
        "'vicuna', 'chatml', 'qwen', 'llama2', 'llama3', 'baichuan', 'baichuan2', 'chatglm2', 'chatglm3', 'internlm2')",
    ),
    (["--quantization_bit", "3"], "argument --quantization_bit/--quantization-bit: invalid choice: '3' (choose from 4, 8)"),
    (["--torch_dtype", "float8"],
     "argument --torch_dtype/--torch-dtype: invalid choice: 'float8' (choose from 'auto', 'float32', 'bfloat16', 'float16')"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "lr_scheduler_type reduce_lr_on_plateau requires an eval strategy"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAINING_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_TRAINING_FLAGS])
def test_bad_training_flag_is_refused_before_anything_is_read(train, tmp_path, flags, message):
    assert train(*read_nothing(tmp_path), *flags) == f"error: {message}"


def test_deepspeed_file_that_is_not_json(train, tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text('{"train_batch_size": "auto",\n  zero_optimization: {"stage": 2}}')
    assert train(*read_nothing(tmp_path), "--deepspeed", path) == (
        f"error: --deepspeed {path}: line 2: invalid JSON (Expecting property name enclosed in double quotes)"
    )


def test_lora_config_that_is_not_json(train, tmp_path):
    path = tmp_path / "lora_config.json"
    path.write_text('{"lora_r": 8,\n  "lora_alpha": }')
    assert train(*read_nothing(tmp_path), "--lora_config", path) == (
        f"error: --lora_config {path}: line 2: invalid JSON (Expecting value)"
    )


def test_lora_config_that_is_not_utf8(train, tmp_path):
    path = tmp_path / "lora_config.json"
    path.write_bytes('{"lora_r": 8,\n "注释": "秩"}'.encode("gbk"))  # saved by an editor in the Chinese legacy encoding
    assert train(*read_nothing(tmp_path), "--lora_config", path) == (
        f"error: --lora_config {path}: line 2: not valid UTF-8 (byte 18); convert it first, e.g. iconv -f GBK -t UTF-8"
    )


def test_resume_from_a_checkpoint_that_does_not_exist(train, tmp_path):
    missing = tmp_path / "previous-run" / "checkpoint-500"
    assert train(*read_nothing(tmp_path), "--resume_from_checkpoint", missing) == (
        f"error: --resume_from_checkpoint {missing}: no such checkpoint folder"
    )


def test_model_path_that_does_not_exist(train, tmp_path):
    missing = tmp_path / "models" / "Qwen2-7B"
    assert train("--model_name_or_path", missing) == f"error: --model_name_or_path {missing}: no such folder"


def test_relative_model_path_that_does_not_exist_offline(train, monkeypatch):
    """A relative path like models/X reads as a hub id; offline (as CI is) it is named, not a traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying for 30 s
    assert train("--model_name_or_path", "models/no-such-model").startswith(
        "error: --model_name_or_path models/no-such-model: no such folder, and not fetchable as a hub id ("
    )


def test_model_folder_without_weights(train, tmp_path, tiny_model):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder)
    assert train("--model_name_or_path", folder) == (
        f"error: --model_name_or_path {folder}: the folder has no weights (*.safetensors or *.bin)"
    )


def test_model_folder_without_tokenizer(train, tmp_path, tiny_model):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder)
    assert train("--model_name_or_path", folder) == (
        f"error: --model_name_or_path {folder}: the folder has no tokenizer "
        "(none of tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt)"
    )


def test_lora_target_that_is_not_in_the_model(train):
    assert train("--lora_target", "q_proj,query_key_value") == (
        "error: --lora_target query_key_value: no such linear layer in the model "
        "(it has: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)"
    )


@pytest.mark.slow
def test_malformed_json_through_the_real_script(tmp_path, tiny_model):
    path = tmp_path / "array.json"
    path.write_text(MALFORMED_ARRAY)
    out = tmp_path / "out"
    line = script_error_line(
        "train_lora.py", "--model_name_or_path", tiny_model, "--train_file", path, "--output_dir", out
    )
    assert line == f"error: {path}: line 3: invalid JSON (Expecting ',' delimiter, column 23)"
    assert not out.exists()


# --- accepted on purpose: these must train ------------------------------------------------------------


def train_one_step(tiny_model, data, out, cache) -> dict:
    train_lora.main([
        "--model_name_or_path", str(tiny_model), "--train_file", str(data), "--output_dir", str(out),
        "--max_steps", "1", "--save_strategy", "no", "--report_to", "none", "--cache_dir", str(cache),
    ])
    return json.loads((out / "train_results.json").read_text())


def test_utf8_byte_order_mark_is_accepted(tiny_model, tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + lines(ALPACA, ALPACA).encode("utf-8"))
    assert train_one_step(tiny_model, path, tmp_path / "out", tmp_path / "cache")["global_step"] == 1
    # The adapter is saved as safetensors, never as a pickle.
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "adapter_model.bin").exists()


def test_null_input_is_accepted_as_empty(tiny_model, tmp_path, capsys):
    path = write_jsonl(tmp_path / "null.json", [ALPACA, {**ALPACA, "input": None}])
    assert train_one_step(tiny_model, path, tmp_path / "out", tmp_path / "cache")["global_step"] == 1
    assert "Training records: 2" in capsys.readouterr().out


# --- predict_fora.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter made on a narrower Llama (hidden 32, not 64): its matrices do not fit tiny_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size = 32, 96
    folder = tmp_path_factory.mktemp("foreign-adapter")
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(folder)
    return folder


@pytest.fixture
def predict(capsys, tmp_path, tiny_model):
    """predict(*flags) -> the error line of predict_fora.py on good test data and the tiny model, `flags` overriding."""
    test_file = write_jsonl(tmp_path / "test.json", [ALPACA])

    def run(*flags) -> str:
        return error_line(
            capsys, predict_fora,
            "--ori_model_dir", tiny_model, "--test_path", test_file, "--output_dir", tmp_path / "predictions",
            "--max_new_tokens", "2", *flags,
        )

    return run


@pytest.mark.slow
def test_predict_with_an_adapter_for_another_base_through_the_real_script(foreign_adapter, tiny_model, tmp_path):
    out = tmp_path / "predictions"
    line = script_error_line(
        "predict_fora.py", "--model_dir", foreign_adapter, "--ori_model_dir", tiny_model,
        "--test_path", write_jsonl(tmp_path / "test.json", [ALPACA]), "--output_dir", out,
    )
    assert line == (
        f"error: --model_dir {foreign_adapter}: the adapter was trained for another base model than {tiny_model} "
        "(weight shapes differ)"
    )
    assert not out.exists()


def test_predict_with_an_adapter_for_another_architecture(predict, foreign_adapter, tiny_model, tmp_path):
    adapter = shutil.copytree(foreign_adapter, tmp_path / "gpt2-adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    assert predict("--model_dir", adapter) == (
        f"error: --model_dir {adapter}: does not fit the base model {tiny_model} "
        "(Target modules {'c_attn'} not found in the base model. Please check the target modules and try again.)"
    )


def test_predict_with_an_unknown_template_is_refused_before_the_model_is_looked_for(predict, tmp_path):
    line = predict("--template", "qwen3", "--ori_model_dir", tmp_path / "no-model")
    assert line.startswith("error: argument --template: invalid choice: 'qwen3' (choose from 'auto', 'chat_template'")


def test_predict_with_a_model_folder_without_weights(predict, tmp_path, tiny_model):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder)
    assert predict("--model_dir", folder) == (
        f"error: --model_dir {folder}: the folder has no weights (*.safetensors or *.bin)"
    )


def test_predict_output_that_exists_and_is_not_ours(predict, tmp_path):
    out = tmp_path / "predictions"
    out.mkdir()
    (out / "generated_predictions.jsonl").write_text("my own notes\n")
    assert predict("--output_dir", out) == (
        f"error: --output_dir {out} holds an earlier run (generated_predictions.jsonl); "
        "pass --overwrite_output_dir to replace it or choose another --output_dir"
    )
    assert snapshot(out) == {"generated_predictions.jsonl": b"my own notes\n"}


def test_predict_output_dir_that_is_a_file(predict, tmp_path):
    out = tmp_path / "predictions.txt"
    out.write_text("mine\n")
    assert predict("--output_dir", out) == f"error: --output_dir {out}: is a file, expected a folder"
    assert out.read_text() == "mine\n"


def test_test_set_without_references_is_predicted_not_scored(tiny_model, tmp_path, capsys):
    records = [{"instruction": "Extract the triples.", "input": "The pump leaks."}, {"instruction": "Say hi."}]
    test_file = write_jsonl(tmp_path / "unlabelled.json", records)
    out = tmp_path / "predictions"
    results = predict_fora.main([
        "--ori_model_dir", str(tiny_model), "--test_path", str(test_file), "--output_dir", str(out),
        "--max_new_tokens", "2",
    ])
    predictions = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in predictions] == [None, None]
    assert (results["scored"], results["total"]) == (0, 2) and "rouge-1" not in results
    captured = capsys.readouterr()
    notices = [line for line in captured.out.splitlines() if "no reference" in line]
    assert len(notices) == 1
    assert notices[0].startswith("Scored 0 of 2 records (2 have no reference: predicted, not scored)")
    assert "error:" not in captured.err


# --- merge_lora.py -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_merge_with_an_adapter_for_another_base_through_the_real_script(foreign_adapter, tiny_model, tmp_path):
    out = tmp_path / "merged"
    line = script_error_line(
        "merge_lora.py", "--adapter", foreign_adapter, "--base_model", tiny_model, "--output_dir", out
    )
    assert line == (
        f"error: --adapter {foreign_adapter}: the adapter was trained for another base model than {tiny_model} "
        "(weight shapes differ)"
    )
    assert not out.exists()
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_merge_without_its_required_flags(capsys):
    assert error_line(capsys, merge_lora) == (
        "error: the following arguments are required: --adapter, --output_dir/--output-dir"
    )


# --- what is trusted: remote code, pickles -------------------------------------------------------------


def test_remote_code_runs_only_when_asked():
    (model_args,) = parse_args((ModelArguments,), [])
    (predict_args,) = parse_args((PredictArguments,), ["--output_dir", "o", "--test_path", "t.json"])
    (merge_args,) = parse_args((MergeArguments,), ["--adapter", "a", "--output_dir", "o"])
    assert [args.trust_remote_code for args in (model_args, predict_args, merge_args)] == [False, False, False]
    assert parse_args((ModelArguments,), ["--trust_remote_code"])[0].trust_remote_code
    assert not [where for where, call in project_calls() if keyword_is(call, "trust_remote_code", True)]


def test_an_adapter_recorded_with_remote_code_does_not_switch_it_on(predict, capsys, tiny_model, tmp_path):
    """Whoever wrote fora_run.json does not decide to run the base model's Python code: the user's flag does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fora.run import RunRecord

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)
    recorded = {"base_model": str(tiny_model), "finetuning_type": "lora", "torch_dtype": "float32", "trust_remote_code": True}
    RunRecord(**recorded).save(adapter)
    message = (
        f"{adapter}: its base {tiny_model} was trained with --trust_remote_code (fora_run.json); "
        "pass --trust_remote_code if you trust that folder's Python code"
    )
    assert predict("--model_dir", adapter) == f"error: {message}"
    assert error_line(capsys, merge_lora, "--adapter", adapter, "--output_dir", tmp_path / "merged") == f"error: {message}"
    assert not (tmp_path / "predictions").exists() and not (tmp_path / "merged").exists()


def test_every_torch_load_reads_weights_only():
    """A pickled checkpoint can run code as it loads; the project reads safetensors or torch.load(weights_only=True)."""
    unsafe = [
        where
        for where, call in project_calls()
        if dotted_name(call.func) == "torch.load" and not keyword_is(call, "weights_only", True)
    ]
    assert unsafe == []


def project_calls():
    """(file:line, call) for every call in the project's tracked Python files."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                yield f"{name}:{node.lineno}", node


def dotted_name(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)
