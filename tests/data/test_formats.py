"""fora/data/formats.py: every data format into conversations, bad records refused in one line, empty responses."""

import json

import pytest

from fora.data.formats import load_conversations
from support import ALPACA, SHARED_DATA, data_error, masked_and_trained, tokenize_file, turns_of, write_jsonl


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
    assert "no record has the response field 'output'" in data_error(path)
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


# --- bad records: one line naming file, line or record, and field ------------------------------------


def test_record_that_is_a_list(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, ["Extract", "x", "y"]])
    assert data_error(path) == f"{path}: line 2: the record is a list, expected an object"
    path.write_text(json.dumps([["q", "a"], ["q2", "a2"]]))
    assert data_error(path) == f"{path}: record 1: the record is a list, expected an object"


def test_record_missing_its_response(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, {"instruction": "x", "input": "y"}])
    assert data_error(path) == f"{path}: line 2: field 'output' is missing"
    path.write_text(json.dumps([ALPACA, {"instruction": "x", "output": None}]))
    assert data_error(path) == f"{path}: record 2: field 'output' is missing"


def test_record_without_any_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"input": "x", "target": "y"}, {"input": "", "target": "y"}])
    assert data_error(path) == f"{path}: line 2: field 'input' is missing or empty (and there is no instruction)"


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
    assert data_error(path) == f"{path}: line 2: field {field!r} must be a string, got {kind}"


def test_malformed_history(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "history": [["only the question"]]}])
    assert data_error(path) == f"{path}: line 1: field 'history' must be a list of [user, assistant] string pairs"


def test_column_no_record_has(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    message = data_error(path, prompt_column="question")
    assert message == f"{path}: column 'question' given by --prompt_column is in no record"
    message = data_error(path, response_column="answer")
    assert message == f"{path}: column 'answer' given by --response_column is in no record"


def test_format_that_cannot_be_detected(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    assert data_error(path) == (
        f"{path}: cannot tell the data format from the fields ['answer', 'question']; "
        "pass --data_format or --prompt_column and --response_column"
    )


def test_columns_format_needs_both_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    assert "--data_format columns needs --prompt_column and --response_column" in data_error(
        path, data_format="columns", prompt_column="question"
    )


def test_bad_xtuner_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "x.json", [{"conversation": [{"input": "q1", "output": "a1"}, {"input": "q2"}]}]
    )
    assert data_error(path) == f"{path}: line 1: field 'conversation[1].output' is missing"
    path = write_jsonl(tmp_path / "x.json", [{"conversation": []}])
    assert "line 1: field 'conversation' must be a non-empty list" in data_error(path)


def test_bad_sharegpt_turns(tmp_path):
    human = {"from": "human", "value": "q"}
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [human, human]}])
    assert data_error(path) == (
        f"{path}: line 1: conversations[1].from is 'human'; expected human and gpt turns in alternation"
    )
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [human, {"from": "gpt", "value": 3}]}])
    assert data_error(path) == f"{path}: line 1: field 'conversations[1].value' must be a string, got number"
    path = write_jsonl(tmp_path / "s.json", [{"conversations": [human]}])
    assert data_error(path) == f"{path}: line 1: the last turn of 'conversations' has no gpt answer"


# --- empty responses: --empty_response train | skip | error --------------------------------------


def test_empty_response_train_keeps_it_and_learns_eos_alone(with_empty, tokenizer):
    conversations, empty = load_conversations(str(with_empty), empty_response="train")
    assert (len(conversations), empty) == (2, 1)
    rows = tokenize_file(tokenizer, with_empty)
    assert masked_and_trained(tokenizer, rows[1])[1] == tokenizer.eos_token
    assert "Nothing here." in masked_and_trained(tokenizer, rows[1])[0]


def test_empty_response_skip_drops_it(with_empty):
    conversations, empty = load_conversations(str(with_empty), empty_response="skip")
    assert empty == 1
    assert [c.turns[-1][1] for c in conversations] == ["pump_部件故障_leaks"]
    assert conversations[0].where == f"{with_empty}: line 1"


def test_empty_response_error_names_record_and_field(with_empty, tmp_path):
    message = data_error(with_empty, empty_response="error")
    assert message.startswith(f"{with_empty}: line 2: field 'output' is empty")
    assert "--empty_response" in message
    path = write_jsonl(tmp_path / "x.json", [{"conversation": [{"input": "q1", "output": " "}, {"input": "q2", "output": "a"}]}])
    assert data_error(path, empty_response="error").startswith(f"{path}: line 1: field 'conversation[0].output' is empty")
    path = write_jsonl(tmp_path / "h.json", [{**ALPACA, "history": [["q", ""]]}])
    assert data_error(path, empty_response="error").startswith(f"{path}: line 1: field 'history[0][1]' is empty")


@pytest.mark.skipif(not (SHARED_DATA / "spo_0.json").is_file(), reason="the FoRA authors' data is not here")
def test_authors_data_trains_on_its_empty_outputs():
    path = SHARED_DATA / "spo_0.json"
    conversations, empty = load_conversations(str(path))
    assert (len(conversations), empty) == (1441, 22)
    assert len(load_conversations(str(path), empty_response="skip")[0]) == 1441 - 22
    assert "field 'output' is empty" in data_error(path, empty_response="error")
