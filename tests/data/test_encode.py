"""fora/data/encode.py: tokenizing a conversation, the prompt masked and every reply trained, and the length limits."""

import re

import pytest

from fora.data.encode import IGNORE_INDEX, encode
from fora.data.templates import Segment, get_template
from support import ALPACA, masked_and_trained, tokenize_file, write_jsonl

# --- tokenizing and masking ------------------------------------------------------------------------


def test_chat_template_masks_the_prompt_and_trains_response_plus_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    (row,) = tokenize_file(tokenizer, path)
    masked, trained = masked_and_trained(tokenizer, row)
    assert trained == "pump_部件故障_leaks" + tokenizer.eos_token
    assert "Extract the triples.\nThe pump leaks." in masked
    assert masked.endswith("<|im_start|>assistant\n")
    assert row["length"] == len(row["input_ids"]) and row["truncated"] is False


def test_default_template_masks_human_part(plain_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA])
    (row,) = tokenize_file(plain_tokenizer, path)
    assert masked_and_trained(plain_tokenizer, row) == (
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
    (row,) = tokenize_file(tok, path)
    masked, trained = masked_and_trained(tok, row)
    assert trained == f"a1{tok.eos_token}a2{tok.eos_token}"
    assert "q1" in masked and "q2" in masked
    # Each trained span follows its own prompt: prompt 1, a1, prompt 2, a2.
    runs = "".join("T" if label != IGNORE_INDEX else "M" for label in row["labels"])
    assert re.fullmatch("M+T+M+T+", runs)


def test_system_text_is_masked(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{**ALPACA, "system": "SYSTEM-TEXT"}])
    (row,) = tokenize_file(tokenizer, path)
    masked, trained = masked_and_trained(tokenizer, row)
    assert "SYSTEM-TEXT" in masked and "SYSTEM-TEXT" not in trained


def test_length_limits_cut_source_and_target(plain_tokenizer, tmp_path):
    long = {"instruction": "word " * 50, "output": "answer " * 50}
    path = write_jsonl(tmp_path / "d.json", [long, {"instruction": "hi", "output": "ok"}])
    long_row, short_row = tokenize_file(plain_tokenizer, path, max_source_length=10, max_target_length=5)
    assert long_row["labels"][:10] == [IGNORE_INDEX] * 10
    assert len(long_row["input_ids"]) == 15 and long_row["labels"][10:] == long_row["input_ids"][10:]
    assert masked_and_trained(plain_tokenizer, long_row)[1] == "answer answer answer answer answer"  # the EOS is cut too
    assert long_row["truncated"] is True
    assert short_row["truncated"] is False
    assert masked_and_trained(plain_tokenizer, short_row)[1] == "ok" + plain_tokenizer.eos_token


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


# --- a prompt longer than --max_source_length loses the end of the user's text, not the template ----------


@pytest.mark.parametrize(
    "template_name, header", [(None, "<|im_end|>\n<|im_start|>assistant\n"), ("alpaca", "\n\n### Response:\n")]
)
def test_cut_prompt_keeps_its_header_and_is_masked_whole(tokenizer, plain_tokenizer, tmp_path, template_name, header):
    tokenizer = plain_tokenizer if template_name else tokenizer
    text = "The pump leaks oil. 发动机水温高。" * 60
    long = {"instruction": "Extract the triples.", "input": text, "output": "pump_leaks"}
    path = write_jsonl(tmp_path / "d.json", [long])
    (row,) = tokenize_file(tokenizer, path, get_template(tokenizer, template_name), max_source_length=64, max_target_length=16)
    assert row["truncated"] is True
    masked, trained = masked_and_trained(tokenizer, row)
    assert masked.endswith(header) and "Extract the triples.\nThe pump leaks oil." in masked
    assert trained == "pump_leaks" + tokenizer.eos_token  # the reply is whole: only the prompt was too long
    prompt_length = row["labels"].index(next(label for label in row["labels"] if label != IGNORE_INDEX))
    assert 60 <= prompt_length <= 64 and row["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
