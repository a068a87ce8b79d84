"""fora/data/records.py: JSON arrays and JSON Lines whatever the suffix, and unreadable files as one located line."""

import json

import pytest

from fora.data.records import read_records
from support import ALPACA, data_error, turns_of, write_jsonl

# --- layouts --------------------------------------------------------------------------------------


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


def test_utf8_bom_crlf_and_line_separator_inside_strings(tmp_path):
    text = "".join(json.dumps({**ALPACA, "output": f"a\u2028b{i}"}, ensure_ascii=False) + "\r\n" for i in range(2))
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [turns[0][1] for _, turns in turns_of(path)] == ["a\u2028b0", "a\u2028b1"]


def test_blank_lines_in_json_lines_are_skipped_and_lines_still_counted(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps({"instruction": 5, "output": "x"}) + "\n")
    assert read_records(str(tmp_path / "d.json"))[1].where == f"{path}: line 3"
    assert data_error(path) == f"{path}: line 3: field 'instruction' must be a string, got number"


# --- bad data: one line naming file, line or record, and field ------------------------------------


def test_invalid_json_lines_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n" + '{"instruction": "x", "output": }\n')
    assert data_error(path).startswith(f"{path}: line 3: invalid JSON (Expecting value")


def test_invalid_first_line_names_line_1(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "x",\n' + json.dumps(ALPACA) + "\n")
    assert data_error(path).startswith(f"{path}: line 1: invalid JSON")


def test_invalid_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    assert data_error(path).startswith(f"{path}: line 3: invalid JSON (Expecting ',' delimiter")


def test_text_after_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ALPACA, ALPACA], indent=2) + "\n]\n")
    lines = path.read_text().count("\n")
    assert data_error(path).startswith(f"{path}: line {lines}: invalid JSON (Extra data")


def test_gbk_file_is_explained(tmp_path):
    path = tmp_path / "gbk.json"
    gbk_line = json.dumps({**ALPACA, "input": "发动机水温高"}, ensure_ascii=False).encode("gbk")
    path.write_bytes((json.dumps(ALPACA) + "\n").encode() + gbk_line)
    message = data_error(path)
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
    assert data_error(path) == f"{path}: {expected}"


def test_directory_and_missing_file(tmp_path):
    assert data_error(tmp_path) == f"{tmp_path}: is a directory, expected a JSON or JSON Lines file"
    assert data_error(tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: no such file"
