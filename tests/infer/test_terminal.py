"""fora/infer/terminal.py (cli_demo.py): the chat in a pseudo-terminal, and its one-line mistakes."""

import os
import shutil
import sys

import pytest

from support import ONE_THREAD, REPO, run_script

pytestmark = pytest.mark.usefixtures("one_thread")


# --- cli_demo.py in a pseudo-terminal -----------------------------------------------------------------


@pytest.mark.slow
def test_terminal_two_turns_clear_exit(adapter):
    """Greedy replies: after `clear`, the first message gets the first reply again (no history in its prompt)."""
    pexpect = pytest.importorskip("pexpect")

    child = pexpect.spawn(
        sys.executable, ["cli_demo.py", "--model_dir", str(adapter), "--max_new_tokens", "8", "--temperature", "0"],
        cwd=str(REPO), env={**os.environ, **ONE_THREAD, "TERM": "dumb"}, encoding="utf-8", timeout=300,
    )
    try:
        child.expect("User: ")
        turns = []
        for message in ("hello", "and then?", "clear", "hello"):
            child.sendline(message)
            child.expect("\r\nUser: ")
            turns.append(child.before)
        assert "Assistant: " in turns[0] and "Assistant: " in turns[1]
        assert turns[0].split("Assistant: ")[1].strip(), "empty reply"
        assert "(conversation cleared)" in turns[2]
        assert turns[3] == turns[0]
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in "".join(turns)


@pytest.mark.slow
def test_terminal_mistakes_are_one_line(adapter, tiny_model, tmp_path):
    from fora.errors import UserError
    from fora.infer import terminal as cli_demo

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    result = run_script(sys.executable, "cli_demo.py", "--model_dir", str(broken), env=ONE_THREAD)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: --model_dir {broken}: a file in it cannot be read (")
    with pytest.raises(UserError, match="--side_by_side needs --model_dir ADAPTER"):
        cli_demo.main(["--ori_model_dir", str(tiny_model), "--side_by_side"])


def test_the_loop_answers_clears_and_ends_at_exit_or_end_of_input(tiny_model, monkeypatch, capsys):
    """In this process, input() scripted: each message gets a reply, blank lines none, `clear` empties the history."""
    from fora.infer import terminal as cli_demo

    def typing(*lines):
        remaining = list(lines)

        def read(prompt=""):
            if not remaining:
                raise EOFError  # Ctrl-D
            return remaining.pop(0)

        return read, remaining

    read, remaining = typing("hello", "   ", "clear", "hello", "exit", "never read")
    monkeypatch.setattr("builtins.input", read)
    cli_demo.main(["--ori_model_dir", str(tiny_model), "--max_new_tokens", "4", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("Chatting with ") and out.count("\nAssistant: ") == 2 and "(conversation cleared)" in out
    assert remaining == ["never read"]
    monkeypatch.setattr("builtins.input", typing("hello")[0])
    cli_demo.main(["--ori_model_dir", str(tiny_model), "--max_new_tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out.count("\nAssistant: ") == 1
