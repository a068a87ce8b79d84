"""fora/infer/web.py (web_demo.py): the page in Streamlit's AppTest, and in a real Chromium."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from support import ONE_THREAD, REPO, free_port, turns_of

pytestmark = pytest.mark.usefixtures("one_thread")


CHROMIUM = Path("/usr/bin/chromium")


# --- web_demo.py in Streamlit's AppTest ----------------------------------------------------------------


def page(monkeypatch, *flags: str):
    """web_demo.py after its first run, with FLAGS as given after `streamlit run web_demo.py --`."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["web_demo.py", *flags])
    app = AppTest.from_file(str(REPO / "web_demo.py"), default_timeout=300)
    return app.run()


def contents(app) -> list[tuple[str, str]]:
    return [(message.name, " ".join(m.value for m in message.text)) for message in app.chat_message]


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


def test_page_shows_replies_as_written_and_errors_in_the_bubble(monkeypatch, adapter):
    """A reply of one triple per line keeps its lines (Markdown would join them and read `_` as emphasis);
    a failed reply shows its error in one line in its bubble and stays out of the next prompt."""
    from fora.infer import chat
    from fora.infer.web import load_model

    flags = ("--model_dir", str(adapter), "--max_new_tokens", "8")
    app = page(monkeypatch, *flags)
    model = load_model(flags)
    written = "pump_部件故障_leaks\nvalve_组成_seal"

    def reply_as_written(self, history, exchange, who, settings):
        exchange.replies[who], exchange.notes[who] = written, []
        yield written

    with monkeypatch.context() as patch:
        patch.setattr(chat.ChatModel, "respond", reply_as_written)
        app.chat_input[0].set_value("list the triples").run()
    assert [t.value for t in app.chat_message[1].text] == [written] and not app.chat_message[1].markdown

    def out_of_memory(**kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(model.model, "generate", out_of_memory)
        app.chat_input[0].set_value("and then?").run()
    assert not app.exception
    (error,) = app.chat_message[3].error
    assert error.value == "error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    prompt, _ = model.prompt(app.session_state["history"], "next", chat.FINE_TUNED, chat.Settings(8, 0.0, 1.0))
    assert "and then?" not in model.tokenizer.decode(prompt)
    app.button(key="regenerate").click().run()  # the failed reply, generated again
    history = app.session_state["history"]
    assert [e.user for e in history] == ["list the triples", "and then?"] and not history[1].errors
    assert not app.chat_message[3].error and app.chat_message[3].text[0].value == history[1].replies["fine-tuned"]


def test_page_side_by_side_with_a_second_adapter(monkeypatch, adapter):
    app = page(monkeypatch, "--model_dir", str(adapter), "--compare_dir", str(adapter), "--max_new_tokens", "4", "--side_by_side")
    app.chat_input[0].set_value("hello").run()
    assert [m.name for m in app.chat_message] == ["user", "assistant", "assistant", "assistant"]
    assert [m.caption[0].value for m in app.chat_message[1:]] == [
        "Fine-tuned (adapter on)", f"Compared ({adapter})", "Base (adapter off)"]


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


# --- web_demo.py in a real browser ------------------------------------------------------------------------


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


@contextmanager
def chat_in_chromium(tmp_path: Path, *flags: str):
    """web_demo.py served on 127.0.0.1 with FLAGS, and a Chromium page: (the page, the port). Both stop after."""
    playwright = pytest.importorskip("playwright.sync_api")

    port = free_port()
    log = tmp_path / "streamlit.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "web_demo.py", "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port), "--", *flags],
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
                yield browser.new_page(viewport={"width": 1280, "height": 800}), port
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


NEEDS_CHROMIUM = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's Chromium at /usr/bin/chromium (scripts/setup.sh installs it as root)"
)


@pytest.mark.slow
@NEEDS_CHROMIUM
def test_browser_chat(adapter, tmp_path):
    """The page as a user drives it: two turns, clear, a reply held and kept across a rerun, the stop button,
    two tabs, line breaks, the download, side by side."""
    with chat_in_chromium(tmp_path, "--model_dir", str(adapter), "--max_new_tokens", "8") as (page, port):
        drive_the_page(page, port, tmp_path)


DEMO_ADAPTER = REPO / "output" / "demo" / "adapter"


@pytest.mark.slow
@NEEDS_CHROMIUM
@pytest.mark.skipif(not (DEMO_ADAPTER / "adapter_config.json").is_file(), reason="needs the demo's adapter: bash scripts/demo.sh")
def test_the_demo_fine_tune_answers_a_test_question_beside_its_base(tmp_path):
    """The README's picture: the demo's fine-tune and its base answer the first question of data/test.json
    side by side, greedy; the fine-tune's triples stay one per line. FORA_CHAT_PICTURE=docs/chat.png writes it."""
    from playwright.sync_api import expect

    from fora.data.formats import load_conversations

    conversations, _ = load_conversations(str(REPO / "data" / "test.json"))
    question = conversations[0].turns[0][0]
    with chat_in_chromium(tmp_path, "--model_dir", str(DEMO_ADAPTER), "--side_by_side", "--temperature", "0",
                          "--max_new_tokens", "64") as (page, port):
        messages = page.get_by_test_id("stChatMessage")
        run = FinishedRuns(page).after
        page.set_default_timeout(300_000)
        run(lambda: page.goto(f"http://127.0.0.1:{port}"), timeout=600)
        box = page.get_by_test_id("stChatInputTextArea")
        box.fill(question)
        run(lambda: box.press("Enter"), timeout=600)
        expect(messages).to_have_count(3)
        fine_tuned = messages.nth(1).get_by_test_id("stChatMessageContent").inner_text()
        assert "Fine-tuned (adapter on)" in fine_tuned
        lines = [line for line in fine_tuned.splitlines() if line.count("_") >= 2]
        assert len(lines) >= 2, fine_tuned  # one triple per line, as trained
        page.screenshot(path=str(tmp_path / "chat.png"))
    if os.environ.get("FORA_CHAT_PICTURE"):
        shutil.copy(tmp_path / "chat.png", REPO / os.environ["FORA_CHAT_PICTURE"])


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

    # The stop button that replaces send while a reply streams: the reply keeps what it had (marked stopped
    # from the page's next run on: Streamlit draws nothing more in a stopped run).
    send("and more")
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('[data-testid=stChatMessageContent]');"
        " return m.length == 4 && m[3].innerText.trim().split(/\\s+/).length >= 3; }"
    )
    page.get_by_role("button", name="Stop script").click()
    expect(box).to_be_enabled()
    assert len(content(3).split()) >= 3, "the words shown before the stop are gone"

    # Two tabs, one model: the second tab's reply waits for the first's, says so, and its stop ends the
    # wait at once, while the first tab's reply goes on.
    other = page.context.browser.new_page(viewport={"width": 1280, "height": 800})
    FinishedRuns(other).after(lambda: other.goto(f"http://127.0.0.1:{port}"), timeout=300)
    send("tell me everything again")
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('[data-testid=stChatMessageContent]');"
        " return m.length == 6 && m[5].innerText.trim().split(/\\s+/).length >= 3; }"
    )
    other_box = other.get_by_test_id("stChatInputTextArea")
    other_box.fill("hello")
    other_box.press("Enter")
    other.get_by_text("Waiting for the model").wait_for()
    other.get_by_role("button", name="Stop script").click()
    expect(other_box).to_be_enabled(timeout=10_000)  # the wait ended, not the first tab's reply
    assert box.is_disabled(), "the first tab's reply should still be streaming"
    other.close()
    page.get_by_role("button", name="Stop script").click()
    expect(box).to_be_enabled()

    # A message keeps its line breaks (Shift+Enter), and the conversation downloads as a training record.
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    run(lambda: box.press("Enter"))
    assert content(6).strip() == "first line\nsecond line"
    for stopped in (3, 5):
        expect(messages.nth(stopped).get_by_text("stopped before the end of the reply")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the conversation").click()
    saved = tmp_path / "conversation.jsonl"
    download.value.save_as(saved)
    assert [user for user, _ in turns_of(saved)[0][1]] == [
        "tell me everything", "and more", "tell me everything again", "first line\nsecond line"]

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
