"""fora/chat.py, web_demo.py (Streamlit's AppTest, and a real Chromium) and cli_demo.py (a pseudo-terminal).

The tiny random models answer with random tokens, so the tests check the structure (a reply under
each message, history length, cleared state, notes) and compare replies only where the same prompt
and seed must give the same text.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ONE_THREAD, REPO, run_script
from test_predict import peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model whose large random weights visibly change its replies."""
    return peft_adapter(tiny_model, tmp_path_factory.mktemp("chat-adapter"))


@pytest.fixture(scope="module")
def chat_model(adapter):
    from fora.args import ChatArguments
    from fora.infer.chat import ChatModel

    return ChatModel(ChatArguments(model_dir=str(adapter)))


def reply(model, history, exchange, side, settings, seed=0) -> str:
    import torch

    torch.manual_seed(seed)
    return "".join(model.respond(history, exchange, side, settings))


# --- fora/chat.py ---------------------------------------------------------------------------------


def test_prompt_is_the_one_prediction_builds(chat_model):
    """History and system prompt go through the template and cut of training and prediction."""
    from fora.data.formats import Conversation
    from fora.infer.chat import FINE_TUNED, Exchange, Settings
    from fora.infer.generate import build_prompt

    history = [Exchange("hi", {FINE_TUNED: "hello there"})]
    ids, notes = chat_model.prompt(history, "and now?", FINE_TUNED, Settings(8, 0.0, 1.0, "Be brief."))
    conversation = Conversation("x", "Be brief.", [("hi", "hello there"), ("and now?", None)])
    expected, _ = build_prompt(chat_model.tokenizer, chat_model.template, conversation, 512, 512)
    assert ids == expected and notes == []
    text = chat_model.tokenizer.decode(ids)
    assert text.index("Be brief.") < text.index("hi") < text.index("hello there") < text.index("and now?")


def test_oldest_turns_are_left_out_to_fit_the_context(chat_model):
    from fora.data.formats import Conversation
    from fora.infer.chat import FINE_TUNED, Exchange, Settings
    from fora.infer.generate import build_prompt

    history = [Exchange(f"question {i} " + "word " * 40, {FINE_TUNED: f"answer {i} " + "more " * 40}) for i in range(6)]
    turns = [(e.user, e.replies[FINE_TUNED]) for e in history] + [("the last question", None)]
    room = 250  # prompt tokens left in the context once the reply's tokens are set aside
    settings = Settings(chat_model.context_length - room, 0.0, 1.0)

    def prompt_length(first):
        conversation = Conversation("x", None, turns[first:])
        return len(build_prompt(chat_model.tokenizer, chat_model.template, conversation, 512, 512)[0])

    left_out = next(first for first in range(len(turns)) if prompt_length(first) <= room)
    assert 0 < left_out < len(history)
    ids, notes = chat_model.prompt(history, "the last question", FINE_TUNED, settings)
    assert notes == [f"left out the {left_out} oldest turns to fit the context"]
    text = chat_model.tokenizer.decode(ids)
    assert f"question {left_out - 1} " not in text and f"question {left_out} " in text
    assert "the last question" in text and len(ids) <= room


def test_base_side_is_the_base_model_and_the_adapter_comes_back(chat_model, tiny_model):
    """Side by side: the base reply is the base model's own (adapter off), the fine-tuned one is not."""
    from fora.args import ChatArguments
    from fora.infer.chat import BASE, FINE_TUNED, ChatModel, Exchange, Settings

    settings = Settings(12, 1.0, 1.0)  # sampled with a fixed seed: the same prompt gives the same text
    fine_tuned = reply(chat_model, [], Exchange("hi"), FINE_TUNED, settings)
    base = reply(chat_model, [], Exchange("hi"), BASE, settings)
    base_alone = reply(ChatModel(ChatArguments(ori_model_dir=str(tiny_model))), [], Exchange("hi"), FINE_TUNED, settings)
    assert base == base_alone and base.strip()
    assert fine_tuned != base
    assert reply(chat_model, [], Exchange("hi"), FINE_TUNED, settings) == fine_tuned  # adapter on again


def test_stopped_reply_keeps_what_was_generated(chat_model):
    """Closing the stream (the page reran, Ctrl-C) or settling from another thread (Streamlit's next run)
    stops generation at once and keeps the text so far, marked stopped."""
    from fora.infer.chat import FINE_TUNED, Exchange, Settings

    settings = Settings(1000, 1.0, 1.0)
    exchange = Exchange("tell me everything")
    stream = chat_model.respond([], exchange, FINE_TUNED, settings)
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert exchange.replies[FINE_TUNED] == "".join(pieces).strip() != ""
    assert exchange.notes[FINE_TUNED] == ["stopped before the end of the reply"]
    assert not [t for t in threading.enumerate() if t.name == "chat-reply"]

    exchange = Exchange("and again")
    reader = threading.Thread(target=lambda: list(chat_model.respond([], exchange, FINE_TUNED, settings)))
    reader.start()
    while not exchange.replies.get(FINE_TUNED):
        time.sleep(0.01)
    exchange.settle()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert exchange.replies[FINE_TUNED] and exchange.notes[FINE_TUNED] == ["stopped before the end of the reply"]
    assert len(chat_model.tokenizer.encode(exchange.replies[FINE_TUNED])) < 1000


# --- web_demo.py in Streamlit's AppTest ----------------------------------------------------------------


def page(monkeypatch, *flags: str):
    """web_demo.py after its first run, with FLAGS as given after `streamlit run web_demo.py --`."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["web_demo.py", *flags])
    app = AppTest.from_file(str(REPO / "web_demo.py"), default_timeout=300)
    return app.run()


def contents(app) -> list[tuple[str, str]]:
    return [(message.name, " ".join(m.value for m in message.markdown)) for message in app.chat_message]


def test_page_two_turns_then_clear(monkeypatch, adapter):
    app = page(monkeypatch, "--model_dir", str(adapter), "--max_new_tokens", "8")
    assert not app.error and not app.exception
    assert app.toggle(key="side_by_side").value is False and not app.toggle(key="side_by_side").disabled
    app.chat_input[0].set_value("hello").run()
    app.chat_input[0].set_value("and then?").run()
    shown = contents(app)
    assert [name for name, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[0][1] == "hello" and shown[2][1] == "and then?"
    history = app.session_state["history"]
    assert len(history) == 2 and all(e.replies["fine-tuned"] for e in history)
    assert shown[1][1] == history[0].replies["fine-tuned"]
    app.button(key="clear").click().run()
    assert app.session_state["history"] == [] and not app.chat_message


def test_page_side_by_side(monkeypatch, adapter):
    app = page(monkeypatch, "--model_dir", str(adapter), "--max_new_tokens", "8", "--side_by_side")
    assert app.toggle(key="side_by_side").value is True
    app.chat_input[0].set_value("hello").run()
    assert [m.name for m in app.chat_message] == ["user", "assistant", "assistant"]
    assert [c.value for c in app.chat_message[1].caption] == ["Fine-tuned (adapter on)"]
    assert [c.value for c in app.chat_message[2].caption] == ["Base (adapter off)"]
    assert len(app.columns) == 2
    (exchange,) = app.session_state["history"]
    assert set(exchange.replies) == {"fine-tuned", "base"}
    app.toggle(key="side_by_side").set_value(False).run()
    app.chat_input[0].set_value("just one").run()
    assert [m.name for m in app.chat_message] == ["user", "assistant", "assistant", "user", "assistant"]


def test_page_without_adapter_has_no_base_side(monkeypatch, tiny_model):
    app = page(monkeypatch, "--ori_model_dir", str(tiny_model), "--max_new_tokens", "4")
    assert not app.error and app.toggle(key="side_by_side").disabled


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_dir", "{missing}"], "no such folder"),
        (["--model_dir", "{broken}"], "a file in it cannot be read"),
        (["--temperature", "-1"], "--temperature must not be negative"),
        (["--no_such_flag", "1"], "unknown argument(s): --no_such_flag"),
    ],
)
def test_page_mistakes_show_an_error_box(monkeypatch, adapter, tmp_path, flags, message):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    flags = [f.format(missing=tmp_path / "missing", broken=broken) for f in flags]
    app = page(monkeypatch, *flags)
    assert not app.exception
    (error,) = app.error
    assert error.value.startswith("error: ") and message in error.value and "Traceback" not in error.value
    assert not app.chat_input


# --- cli_demo.py in a pseudo-terminal -----------------------------------------------------------------


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


# --- web_demo.py in a real browser ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(server: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's Chromium at /usr/bin/chromium (scripts/setup.sh installs it as root)")
def test_browser_chat(adapter, tmp_path):
    """The page as a user drives it: two turns, clear, a reply held and kept across a rerun, side by side."""
    playwright = pytest.importorskip("playwright.sync_api")

    port = free_port()
    log = tmp_path / "streamlit.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "web_demo.py", "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port),
             "--", "--model_dir", str(adapter), "--max_new_tokens", "8"],
            cwd=REPO, env={**os.environ, **ONE_THREAD}, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_health(server, f"http://127.0.0.1:{port}/_stcore/health", log)
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            try:
                drive_the_page(browser.new_page(viewport={"width": 1280, "height": 800}), port, tmp_path)
            finally:
                browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert "Traceback" not in log.read_text()


class FinishedRuns:
    """Counts the script runs the server reports finished to the page (Streamlit's protobuf messages on
    the websocket), so the test can wait for the run an action starts to end, however short it is."""

    def __init__(self, page):
        self.page, self.count = page, 0
        page.on("websocket", lambda socket: socket.on("framereceived", self.read))

    def read(self, payload) -> None:
        from google.protobuf.message import DecodeError
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        try:
            message = ForwardMsg.FromString(payload)
        except (DecodeError, TypeError):
            return
        if message.WhichOneof("type") == "script_finished" and message.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY:
            self.count += 1

    def after(self, action, timeout: float = 120) -> None:
        """Do ACTION and wait until the next run has finished."""
        before = self.count
        action()
        deadline = time.monotonic() + timeout
        while self.count == before:
            assert time.monotonic() < deadline, f"no script run finished within {timeout} s"
            self.page.wait_for_timeout(50)  # lets the page's events through


def drive_the_page(page, port: int, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    messages = page.get_by_test_id("stChatMessage")
    box = page.get_by_test_id("stChatInputTextArea")
    run = FinishedRuns(page).after

    def send(text: str) -> None:
        box.fill(text)
        box.press("Enter")

    def content(index: int) -> str:
        return messages.nth(index).get_by_test_id("stChatMessageContent").inner_text()

    page.set_default_timeout(120_000)
    run(lambda: page.goto(f"http://127.0.0.1:{port}"), timeout=300)  # the first visit loads the model

    # Two turns: each reply under its message.
    run(lambda: send("hello"))
    run(lambda: send("and then?"))
    expect(messages).to_have_count(4)
    assert content(0).strip() == "hello" and content(2).strip() == "and then?"
    for user, assistant in ((0, 1), (2, 3)):
        assert content(assistant).strip()
        assert messages.nth(assistant).bounding_box()["y"] > messages.nth(user).bounding_box()["y"]

    run(lambda: page.get_by_role("button", name="Clear the conversation").click())
    expect(messages).to_have_count(0)  # removed elements go once the page has caught up

    # A long reply: the input is held while it streams; a sidebar change reruns the page, and the
    # reply keeps what it had, marked stopped.
    run(lambda: page.get_by_role("slider", name="Max new tokens").press("End"))
    send("tell me everything")
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('[data-testid=stChatMessageContent]');"
        " return m.length == 2 && m[1].innerText.trim().split(/\\s+/).length >= 3; }"
    )
    assert box.is_disabled(), "the input should be held while a reply streams"
    run(lambda: page.get_by_role("slider", name="Temperature").press("ArrowRight"))
    page.get_by_text("stopped before the end of the reply").wait_for()
    expect(messages).to_have_count(2)
    expect(box).to_be_enabled()
    assert len(content(1).split()) >= 3, "the words shown before the rerun are gone"

    # Side by side, in a new session (a reload starts one, with the flags' settings).
    run(page.reload)
    expect(messages).to_have_count(0)
    run(lambda: page.get_by_text("Side by side with the base").click())
    run(lambda: send("hello"))
    run(lambda: send("and then?"))
    expect(messages).to_have_count(6)
    fine_tuned, base = messages.nth(4).bounding_box(), messages.nth(5).bounding_box()
    assert abs(fine_tuned["y"] - base["y"]) < 5 and base["x"] > fine_tuned["x"] + fine_tuned["width"] / 2
    assert "Fine-tuned (adapter on)" in content(4) and "Base (adapter off)" in content(5)
    page.screenshot(path=str(tmp_path / "chat.png"))
    run(lambda: page.get_by_role("button", name="Clear the conversation").click())
    expect(messages).to_have_count(0)
