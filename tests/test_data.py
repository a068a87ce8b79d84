"""fora.data: reading every format, refusing bad data with one located line, masking labels, caching."""

import contextlib
import json
import re
from dataclasses import replace

import pytest
from conftest import SHARED_DATA, write_jsonl

from fora.args import DataArguments
from fora.data.collator import PaddingCollator
from fora.data.dataset import build_dataset
from fora.data.encode import IGNORE_INDEX, encode, tokenize_conversation
from fora.data.formats import load_conversations
from fora.data.records import read_records
from fora.data.templates import NAMED_TEMPLATES, Segment, get_template
from fora.errors import UserError
from fora.models.tokenizer import load_tokenizer

ALPACA = {"instruction": "Extract the triples.", "input": "The pump leaks.", "output": "pump_部件故障_leaks"}


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_plain):
    return load_tokenizer(str(tiny_model_plain))


def turns_of(path, **kwargs):
    conversations, _ = load_conversations(str(path), **kwargs)
    return [(c.system, c.turns) for c in conversations]


def user_error(path_or_call, *args, **kwargs) -> str:
    """The message of the UserError raised by load_conversations(path) (or by a callable), checked to be one line."""
    call = path_or_call if callable(path_or_call) else lambda: load_conversations(str(path_or_call), *args, **kwargs)
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def split(tokenizer, row) -> tuple[str, str]:
    """(the masked part, the trained part) of a tokenized record, decoded."""
    assert len(row["input_ids"]) == len(row["labels"])
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (IGNORE_INDEX, token)  # a trained label is the token itself, never shifted or padded
    masked = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
    trained = [label for label in row["labels"] if label != IGNORE_INDEX]
    return decode(tokenizer, masked), decode(tokenizer, trained)


def tokenize(tokenizer, path, template=None, max_source_length=512, max_target_length=512, **kwargs):
    conversations, _ = load_conversations(str(path), **kwargs)
    template = template or get_template(tokenizer, None)
    return [
        tokenize_conversation(
            {"where": c.where, "system": c.system, "turns": c.turns}, tokenizer, template, max_source_length,
            max_target_length,
        )
        for c in conversations
    ]


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["jsonl", "array", "pretty-array"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".txt"])
def test_json_array_or_json_lines_whatever_the_suffix(tmp_path, layout, suffix):
    records = [ALPACA, {**ALPACA, "input": "The fan is slow.", "output": "fan_部件故障_slow"}]
    path = tmp_path / f"data{suffix}"
    if layout == "jsonl":
        write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2 if layout == "pretty-array" else None))
    assert turns_of(path) == [
        (None, [("Extract the triples.\nThe pump leaks.", "pump_部件故障_leaks")]),
        (None, [("Extract the triples.\nThe fan is slow.", "fan_部件故障_slow")]),
    ]


def test_alpaca_with_system_and_history(tmp_path):
    record = {**ALPACA, "system": "You extract.", "history": [["Hi", "Hello"], ["Ready?", "Yes"]]}
    path = write_jsonl(tmp_path / "d.json", [record])
    assert turns_of(path) == [
        ("You extract.", [("Hi", "Hello"), ("Ready?", "Yes"), ("Extract the triples.\nThe pump leaks.", "pump_部件故障_leaks")])
    ]


def test_alpaca_null_or_missing_input_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "input": None}, {"instruction": "Say hi.", "output": "hi"}])
    assert turns_of(path) == [(None, [("Extract the triples.", "pump_部件故障_leaks")]), (None, [("Say hi.", "hi")])]


def test_promptcblue_extra_fields_ignored(tmp_path):
    record = {"input": "文本：头痛", "target": "症状：头痛", "type": "ner", "answer_choices": ["症状"], "sample_id": 7}
    path = write_jsonl(tmp_path / "cblue.json", [record])
    assert turns_of(path) == [(None, [("文本：头痛", "症状：头痛")])]


def test_any_prompt_and_response_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.json", [{"question": "2+2?", "answer": "4", "id": 1}])
    assert turns_of(path, prompt_column="question", response_column="answer") == [(None, [("2+2?", "4")])]
    assert turns_of(path, data_format="columns", prompt_column="question", response_column="answer") == [
        (None, [("2+2?", "4")])
    ]


def test_columns_override_the_alpaca_fields(tmp_path):
    record = {"instruction": "Answer.", "question": "2+2?", "answer": "4", "output": "wrong field"}
    path = write_jsonl(tmp_path / "d.json", [record])
    assert turns_of(path, prompt_column="question", response_column="answer") == [(None, [("Answer.\n2+2?", "4")])]


def test_forced_format_wins_over_detection(tmp_path):
    # Detected as alpaca (it has `instruction`), which needs `output`; forced promptcblue reads input/target.
    path = write_jsonl(tmp_path / "d.json", [{"instruction": "ignored", "input": "x", "target": "y"}])
    assert "no record has the response field 'output'" in user_error(path)
    assert turns_of(path, data_format="promptcblue") == [(None, [("x", "y")])]


def test_xtuner_conversation(tmp_path):
    record = {
        "conversation": [
            {"system": "You extract.", "input": "q1", "output": "a1"},
            {"input": "q2", "output": "a2"},
        ]
    }
    path = write_jsonl(tmp_path / "x.json", [record])
    assert turns_of(path) == [("You extract.", [("q1", "a1"), ("q2", "a2")])]


def test_sharegpt_conversations(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "You extract."},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ]
    }
    path = write_jsonl(tmp_path / "s.json", [record, {"system": "S2", "conversations": record["conversations"][1:3]}])
    assert turns_of(path) == [("You extract.", [("q1", "a1"), ("q2", "a2")]), ("S2", [("q1", "a1")])]


def test_prediction_records_may_lack_their_reference(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"instruction": "Say hi."}])
    assert turns_of(path, data_format="alpaca", require_response=False) == [(None, [("Say hi.", None)])]
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [{"from": "human", "value": "q"}]}])
    assert turns_of(path, require_response=False) == [(None, [("q", None)])]


def test_utf8_bom_crlf_and_line_separator_inside_strings(tmp_path):
    text = "".join(json.dumps({**ALPACA, "output": f"a\u2028b{i}"}, ensure_ascii=False) + "\r\n" for i in range(2))
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [turns[0][1] for _, turns in turns_of(path)] == ["a\u2028b0", "a\u2028b1"]


def test_blank_lines_in_json_lines_are_skipped_and_lines_still_counted(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps({"instruction": 5, "output": "x"}) + "\n")
    assert read_records(str(tmp_path / "d.json"))[1].where == f"{path}: line 3"
    assert user_error(path) == f"{path}: line 3: field 'instruction' must be a string, got number"


# --- bad data: one line naming file, line or record, and field ------------------------------------


def test_invalid_json_lines_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n" + '{"instruction": "x", "output": }\n')
    assert user_error(path).startswith(f"{path}: line 3: invalid JSON (Expecting value")


def test_invalid_first_line_names_line_1(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "x",\n' + json.dumps(ALPACA) + "\n")
    assert user_error(path).startswith(f"{path}: line 1: invalid JSON")


def test_invalid_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    assert user_error(path).startswith(f"{path}: line 3: invalid JSON (Expecting ',' delimiter")


def test_text_after_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ALPACA, ALPACA], indent=2) + "\n]\n")
    lines = path.read_text().count("\n")
    assert user_error(path).startswith(f"{path}: line {lines}: invalid JSON (Extra data")


def test_gbk_file_is_explained(tmp_path):
    path = tmp_path / "gbk.json"
    gbk_line = json.dumps({**ALPACA, "input": "发动机水温高"}, ensure_ascii=False).encode("gbk")
    path.write_bytes((json.dumps(ALPACA) + "\n").encode() + gbk_line)
    message = user_error(path)
    assert message.startswith(f"{path}: line 2: not valid UTF-8")
    assert "iconv -f GBK -t UTF-8" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "the file is empty"),
        (" \n\n\t\n", "the file is empty"),
        ("[]", "the JSON array is empty"),
    ],
)
def test_empty_file(tmp_path, content, expected):
    path = tmp_path / "d.json"
    path.write_text(content)
    assert user_error(path) == f"{path}: {expected}"


def test_directory_and_missing_file(tmp_path):
    assert user_error(tmp_path) == f"{tmp_path}: is a directory, expected a JSON or JSON Lines file"
    assert user_error(tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: no such file"


def test_record_that_is_a_list(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, ["Extract", "x", "y"]])
    assert user_error(path) == f"{path}: line 2: the record is a list, expected an object"
    path.write_text(json.dumps([["q", "a"], ["q2", "a2"]]))
    assert user_error(path) == f"{path}: record 1: the record is a list, expected an object"


def test_record_missing_its_response(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, {"instruction": "x", "input": "y"}])
    assert user_error(path) == f"{path}: line 2: field 'output' is missing"
    path.write_text(json.dumps([ALPACA, {"instruction": "x", "output": None}]))
    assert user_error(path) == f"{path}: record 2: field 'output' is missing"


def test_record_without_any_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"input": "x", "target": "y"}, {"input": "", "target": "y"}])
    assert user_error(path) == f"{path}: line 2: field 'input' is missing or empty (and there is no instruction)"


@pytest.mark.parametrize(
    "record, field, kind",
    [
        ({**ALPACA, "input": 42}, "input", "number"),
        ({**ALPACA, "output": ["a", "b"]}, "output", "list"),
        ({**ALPACA, "instruction": {"t": 1}}, "instruction", "object"),
        ({**ALPACA, "system": True}, "system", "boolean"),
    ],
)
def test_non_string_field(tmp_path, record, field, kind):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, record])
    assert user_error(path) == f"{path}: line 2: field {field!r} must be a string, got {kind}"


def test_malformed_history(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "history": [["only the question"]]}])
    assert user_error(path) == f"{path}: line 1: field 'history' must be a list of [user, assistant] string pairs"


def test_column_no_record_has(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    message = user_error(path, prompt_column="question")
    assert message == f"{path}: column 'question' given by --prompt_column is in no record"
    message = user_error(path, response_column="answer")
    assert message == f"{path}: column 'answer' given by --response_column is in no record"


def test_format_that_cannot_be_detected(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    assert user_error(path) == (
        f"{path}: cannot tell the data format from the fields ['answer', 'question']; "
        "pass --data_format or --prompt_column and --response_column"
    )


def test_columns_format_needs_both_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    assert "--data_format columns needs --prompt_column and --response_column" in user_error(
        path, data_format="columns", prompt_column="question"
    )


def test_bad_xtuner_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "x.json", [{"conversation": [{"input": "q1", "output": "a1"}, {"input": "q2"}]}]
    )
    assert user_error(path) == f"{path}: line 1: field 'conversation[1].output' is missing"
    path = write_jsonl(tmp_path / "x.json", [{"conversation": []}])
    assert "line 1: field 'conversation' must be a non-empty list" in user_error(path)


def test_bad_sharegpt_turns(tmp_path):
    human = {"from": "human", "value": "q"}
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [human, human]}])
    assert user_error(path) == (
        f"{path}: line 1: conversations[1].from is 'human'; expected human and gpt turns in alternation"
    )
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [human, {"from": "gpt", "value": 3}]}])
    assert user_error(path) == f"{path}: line 1: field 'conversations[1].value' must be a string, got number"
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [human]}])
    assert user_error(path) == f"{path}: line 1: the last turn of 'conversations' has no gpt answer"


# --- empty responses: --empty_response train | skip | error --------------------------------------


@pytest.fixture
def with_empty(tmp_path):
    return write_jsonl(tmp_path / "d.json", [ALPACA, {**ALPACA, "input": "Nothing here.", "output": ""}])


def test_empty_response_train_keeps_it_and_learns_eos_alone(with_empty, tokenizer):
    conversations, empty = load_conversations(str(with_empty), empty_response="train")
    assert (len(conversations), empty) == (2, 1)
    rows = tokenize(tokenizer, with_empty)
    assert split(tokenizer, rows[1])[1] == tokenizer.eos_token
    assert "Nothing here." in split(tokenizer, rows[1])[0]


def test_empty_response_skip_drops_it(with_empty):
    conversations, empty = load_conversations(str(with_empty), empty_response="skip")
    assert empty == 1
    assert [c.turns[-1][1] for c in conversations] == ["pump_部件故障_leaks"]
    assert conversations[0].where == f"{with_empty}: line 1"


def test_empty_response_error_names_record_and_field(with_empty, tmp_path):
    message = user_error(with_empty, empty_response="error")
    assert message.startswith(f"{with_empty}: line 2: field 'output' is empty")
    assert "--empty_response" in message
    path = write_jsonl(tmp_path / "x.json", [{"conversation": [{"input": "q1", "output": " "}, {"input": "q2", "output": "a"}]}])
    assert user_error(path, empty_response="error").startswith(f"{path}: line 1: field 'conversation[0].output' is empty")
    path = write_jsonl(tmp_path / "h.json", [{**ALPACA, "history": [["q", ""]]}])
    assert user_error(path, empty_response="error").startswith(f"{path}: line 1: field 'history[0][1]' is empty")


@pytest.mark.skipif(not (SHARED_DATA / "spo_0.json").is_file(), reason="the FoRA authors' data is not here")
def test_authors_data_trains_on_its_empty_outputs():
    path = SHARED_DATA / "spo_0.json"
    conversations, empty = load_conversations(str(path))
    assert (len(conversations), empty) == (1441, 22)
    assert len(load_conversations(str(path), empty_response="skip")[0]) == 1441 - 22
    assert "field 'output' is empty" in user_error(path, empty_response="error")


# --- tokenizing and masking ------------------------------------------------------------------------


def test_chat_template_masks_the_prompt_and_trains_response_plus_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    (row,) = tokenize(tokenizer, path)
    masked, trained = split(tokenizer, row)
    assert trained == "pump_部件故障_leaks" + tokenizer.eos_token
    assert "Extract the triples.\nThe pump leaks." in masked
    assert masked.endswith("<|im_start|>assistant\n")
    assert row["length"] == len(row["input_ids"]) and row["truncated"] is False


def test_default_template_masks_human_part(plain_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    (row,) = tokenize(plain_tokenizer, path)
    assert split(plain_tokenizer, row) == (
        "Human: Extract the triples.\nThe pump leaks.\n\nAssistant: ",
        "pump_部件故障_leaks" + plain_tokenizer.eos_token,
    )


@pytest.mark.parametrize(
    "record",
    [
        {**ALPACA, "instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]},
        {"conversation": [{"input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}]},
        {"conversations": [{"from": h, "value": v} for h, v in [("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")]]},
    ],
    ids=["alpaca-history", "xtuner", "sharegpt"],
)
@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "default-template"])
def test_multi_turn_trains_every_assistant_turn(tokenizer, plain_tokenizer, tmp_path, record, chat):
    tok = tokenizer if chat else plain_tokenizer
    path = write_jsonl(tmp_path / "d.json", [record])
    (row,) = tokenize(tok, path)
    masked, trained = split(tok, row)
    assert trained == f"a1{tok.eos_token}a2{tok.eos_token}"
    assert "q1" in masked and "q2" in masked
    # Each trained span follows its own prompt: prompt 1, a1, prompt 2, a2.
    runs = "".join("T" if label != IGNORE_INDEX else "M" for label in row["labels"])
    assert re.fullmatch("M+T+M+T+", runs)


def test_system_text_is_masked(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "system": "SYSTEM-TEXT"}])
    (row,) = tokenize(tokenizer, path)
    masked, trained = split(tokenizer, row)
    assert "SYSTEM-TEXT" in masked and "SYSTEM-TEXT" not in trained


def test_length_limits_cut_source_and_target(plain_tokenizer, tmp_path):
    long = {"instruction": "word " * 50, "output": "answer " * 50}
    path = write_jsonl(tmp_path / "d.json", [long, {"instruction": "hi", "output": "ok"}])
    long_row, short_row = tokenize(plain_tokenizer, path, max_source_length=10, max_target_length=5)
    assert long_row["labels"][:10] == [IGNORE_INDEX] * 10
    assert len(long_row["input_ids"]) == 15 and long_row["labels"][10:] == long_row["input_ids"][10:]
    assert split(plain_tokenizer, long_row)[1] == "answer answer answer answer answer"  # the EOS is cut too
    assert long_row["truncated"] is True
    assert short_row["truncated"] is False
    assert split(plain_tokenizer, short_row)[1] == "ok" + plain_tokenizer.eos_token


def test_encode_cuts_each_reply_and_leaves_out_turns_beyond_the_budget():
    segments = [Segment([1] * 3, [2] * 3), Segment([3] * 4, [4] * 6, cut=True), Segment([5], [6])]
    input_ids, labels, truncated = encode(segments, max_source_length=4, max_target_length=4)
    # turn 1 fits; turn 2's reply is cut to 4, but 4 + 4 then exceeds 8 tokens in all, so it and turn 3 are left out.
    assert input_ids == [1, 1, 1, 2, 2, 2]
    assert labels == [-100, -100, -100, 2, 2, 2]
    assert truncated
    input_ids, labels, truncated = encode(segments[:1] + segments[2:], 4, 4)
    assert (input_ids, labels, truncated) == ([1, 1, 1, 2, 2, 2, 5, 6], [-100] * 3 + [2] * 3 + [-100, 6], False)
    # A prompt the template fitted (its user text cut) counts as cut.
    assert encode([Segment([1] * 3, [2], cut=True)], 4, 4) == ([1, 1, 1, 2], [-100] * 3 + [2], True)


def test_collator_keeps_eos_label_equal_to_pad(tokenizer, tmp_path):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: pad == eos == <|im_end|>
    path = write_jsonl(tmp_path / "d.json", [ALPACA, {"instruction": "Hi", "output": "Hello there, how are you today?"}])
    rows = tokenize(tokenizer, path)
    batch = PaddingCollator(tokenizer.pad_token_id)(rows)
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][i, n - 1].item() == eos  # the EOS reply token is trained
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()  # padding is not
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
        assert batch["labels"][i, :n].tolist() == row["labels"]
    assert batch["labels"].shape == batch["input_ids"].shape == (2, max(len(r["input_ids"]) for r in rows))


# --- build_dataset: cache, report -------------------------------------------------------------------


@contextlib.contextmanager
def main_process_first(desc=None):
    yield


def build(path, tokenizer, data_args, template=None):
    lines = []
    dataset = build_dataset(
        str(path), tokenizer, template or get_template(tokenizer, None), data_args, main_process_first, lines.append
    )
    return dataset, lines


@pytest.fixture
def data_args(tmp_path):
    return DataArguments(cache_dir=str(tmp_path / "cache"))


def test_build_dataset_columns_and_masking(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    dataset, lines = build(path, tokenizer, data_args)
    assert sorted(dataset.column_names) == ["input_ids", "labels", "length"]
    assert split(tokenizer, dataset[0])[1] == "pump_部件故障_leaks" + tokenizer.eos_token
    assert not any("Reusing" in line for line in lines)


def test_cache_is_reused_and_rebuilt_with_overwrite_cache(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, data_args)
    dataset, lines = build(path, tokenizer, data_args)
    assert any(line.startswith(f"Reusing tokenized {path}") for line in lines)
    assert split(tokenizer, dataset[0])[1] == "pump_部件故障_leaks" + tokenizer.eos_token
    _, lines = build(path, tokenizer, replace(data_args, overwrite_cache=True))
    assert not any("Reusing" in line for line in lines)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # rebuilt in place, no temporary folder left


def test_overwrite_cache_rebuilds_on_the_first_local_rank_only(tokenizer, tmp_path, data_args, monkeypatch):
    # Under a launcher the other ranks wait (main_process_first), then load what the first rank rebuilt.
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, data_args)
    monkeypatch.setenv("LOCAL_RANK", "1")
    _, lines = build(path, tokenizer, replace(data_args, overwrite_cache=True))
    assert any("Reusing" in line for line in lines)
    monkeypatch.setenv("LOCAL_RANK", "0")
    _, lines = build(path, tokenizer, replace(data_args, overwrite_cache=True))
    assert not any("Reusing" in line for line in lines)


def test_changed_data_or_limits_are_a_new_cache(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, data_args)
    write_jsonl(path, [{**ALPACA, "output": "changed"}])
    dataset, lines = build(path, tokenizer, data_args)
    assert not any("Reusing" in line for line in lines)
    assert split(tokenizer, dataset[0])[1] == "changed" + tokenizer.eos_token
    for changed in (dict(max_source_length=100), dict(max_target_length=100), dict(empty_response="skip")):
        _, lines = build(path, tokenizer, replace(data_args, **changed))
        assert not any("Reusing" in line for line in lines), changed
    _, lines = build(path, tokenizer, data_args, template=NAMED_TEMPLATES["chatml"])
    assert not any("Reusing" in line for line in lines)
    assert len(list((tmp_path / "cache").iterdir())) == 6


def test_default_cache_is_next_to_the_data(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    build(path, tokenizer, DataArguments())
    assert [p.name.split("-")[0] for p in (tmp_path / ".fora_cache").iterdir()] == ["d"]


def test_cut_records_are_counted_and_reported_also_from_the_cache(tokenizer, tmp_path):
    records = [ALPACA, {**ALPACA, "output": "very long answer " * 30}, {**ALPACA, "input": "long text " * 80}]
    path = write_jsonl(tmp_path / "d.json", records)
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), max_source_length=64, max_target_length=16)
    dataset, lines = build(path, tokenizer, data_args)
    assert len(dataset) == 3  # cut, never dropped
    expected = f"{path}: 2 of 3 records were cut to --max_source_length 64 / --max_target_length 16 (kept, shortened)"
    assert expected in lines
    assert max(dataset["length"]) <= 64 + 16
    dataset, lines = build(path, tokenizer, data_args)
    assert any("Reusing" in line for line in lines) and expected in lines
    assert "truncated" not in dataset.column_names


def test_nothing_cut_nothing_reported(tokenizer, tmp_path, data_args):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    _, lines = build(path, tokenizer, data_args)
    assert not any("cut" in line for line in lines)


@pytest.mark.parametrize(
    "policy, count, message",
    [("train", 2, "1 records have an empty response: trained to answer with EOS alone"), ("skip", 1, "left out")],
)
def test_build_dataset_reports_empty_responses(tokenizer, with_empty, tmp_path, policy, count, message):
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), empty_response=policy)
    dataset, lines = build(with_empty, tokenizer, data_args)
    assert len(dataset) == count
    assert any(message in line for line in lines)


def test_build_dataset_empty_response_error(tokenizer, with_empty, tmp_path):
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), empty_response="error")
    message = user_error(lambda: build(with_empty, tokenizer, data_args))
    assert message.startswith(f"{with_empty}: line 2: field 'output' is empty")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_nothing_left_after_skipping_is_a_user_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "output": ""}])
    data_args = DataArguments(cache_dir=str(tmp_path / "cache"), empty_response="skip")
    assert user_error(lambda: build(path, tokenizer, data_args)).startswith(f"{path}: no records left to train on")


def test_bad_data_stops_build_dataset(tokenizer, tmp_path, data_args):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA) + "\n{oops\n")
    assert user_error(lambda: build(path, tokenizer, data_args)).startswith(f"{path}: line 2: invalid JSON")


# --- a prompt longer than --max_source_length loses the end of the user's text, not the template ----------


@pytest.mark.parametrize(
    "template_name, header", [(None, "<|im_end|>\n<|im_start|>assistant\n"), ("alpaca", "\n\n### Response:\n")]
)
def test_cut_prompt_keeps_its_header_and_is_masked_whole(tokenizer, plain_tokenizer, tmp_path, template_name, header):
    tokenizer = plain_tokenizer if template_name else tokenizer
    text = "The pump leaks oil. 发动机水温高。" * 60
    long = {"instruction": "Extract the triples.", "input": text, "output": "pump_leaks"}
    path = write_jsonl(tmp_path / "d.json", [long])
    (row,) = tokenize(tokenizer, path, get_template(tokenizer, template_name), max_source_length=64, max_target_length=16)
    assert row["truncated"] is True
    masked, trained = split(tokenizer, row)
    assert masked.endswith(header) and "Extract the triples.\nThe pump leaks oil." in masked
    assert trained == "pump_leaks" + tokenizer.eos_token  # the reply is whole: only the prompt was too long
    prompt_length = row["labels"].index(next(label for label in row["labels"] if label != IGNORE_INDEX))
    assert 60 <= prompt_length <= 64 and row["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length


def test_limit_below_the_template_names_the_record(tokenizer, tmp_path, data_args):
    records = [ALPACA, {**ALPACA, "system": "You extract fault triples from Chinese repair notes. " * 5}]
    path = write_jsonl(tmp_path / "d.json", records)
    bare = get_template(tokenizer, None).encode(tokenizer, records[1]["system"], [("", None)])[0][0]
    limit = len(bare) - 5  # the first record fits, the second one's system text alone does not
    message = user_error(lambda: build(path, tokenizer, replace(data_args, max_source_length=limit)))
    assert re.fullmatch(
        rf"{re.escape(str(path))}: line 2: --max_source_length {limit} leaves no room for the user's text: "
        r"the template and system text alone take \d+ tokens",
        message,
    ), message
