"""fora/errors.py: a user's mistake is one line and exit code 2, anything else keeps its traceback; notes once."""

import pytest

from fora import errors
from fora.errors import UserError, exit_on_user_error, note_once


def test_a_user_error_is_one_line_on_stderr_and_exit_code_2(capsys):
    def main():
        print("working")
        raise UserError("data.json: line 2: field 'output' is missing")

    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(main)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("working\n", "error: data.json: line 2: field 'output' is missing\n")


def test_anything_else_is_a_bug_and_keeps_its_traceback(capsys):
    calls = []
    exit_on_user_error(lambda: calls.append("ran"))  # a run that ends normally returns
    assert calls == ["ran"]
    with pytest.raises(KeyError):
        exit_on_user_error(lambda: {}["missing"])
    assert capsys.readouterr().err == ""


def test_a_note_is_printed_the_first_time_only(capsys, monkeypatch):
    monkeypatch.setattr(errors, "_noted", set())
    for message in ("fallback A taken", "fallback B taken", "fallback A taken"):
        note_once(message)
    assert capsys.readouterr().err.splitlines() == ["fallback A taken", "fallback B taken"]
