"""fora/infer/chat.py: the chat's prompt (history, system, the context's room), the base side, a stopped reply.

The tiny random models answer with random tokens, so the tests check the structure and compare replies only
where the same prompt and seed must give the same text.
"""

import threading
import time

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_model(adapter):
    from fora.args import ChatArguments
    from fora.infer.chat import ChatModel

    return ChatModel(ChatArguments(model_dir=str(adapter)))


def reply(model, history, exchange, side, settings, seed=0) -> str:
    import torch

    torch.manual_seed(seed)
    return "".join(model.respond(history, exchange, side, settings))


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


def test_a_failed_reply_is_one_line_and_stays_out_of_later_prompts(chat_model, monkeypatch):
    from fora.infer.chat import FINE_TUNED, Exchange, Settings

    settings = Settings(8, 0.0, 1.0)

    def out_of_memory(**kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    failed = Exchange("first question")
    with monkeypatch.context() as patch:
        patch.setattr(chat_model.model, "generate", out_of_memory)
        assert "".join(chat_model.respond([], failed, FINE_TUNED, settings)) == ""
    assert failed.errors == {FINE_TUNED: "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}
    assert failed.notes[FINE_TUNED] == []  # an error, not a stop
    ids, _ = chat_model.prompt([failed], "second question", FINE_TUNED, settings)
    text = chat_model.tokenizer.decode(ids)
    assert "first question" not in text and "second question" in text
    assert not [t for t in threading.enumerate() if t.name == "chat-reply"]


def test_a_reply_waiting_for_the_model_says_so_and_stops_waiting_when_stopped(chat_model):
    """Another conversation's reply holds the model: this one waits, marked waiting, and a stop ends the
    wait at once (it used to wait for the other reply to end first)."""
    from fora.infer.chat import FINE_TUNED, Exchange, Settings

    exchange = Exchange("hello")
    with chat_model.lock:  # the other conversation's reply
        reader = threading.Thread(target=lambda: list(chat_model.respond([], exchange, FINE_TUNED, Settings(8, 0.0, 1.0))))
        reader.start()
        deadline = time.monotonic() + 10
        while not exchange.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        exchange.settle()
        reader.join(timeout=5)
        assert not reader.is_alive() and time.monotonic() - started < 2
    assert not exchange.waiting and exchange.replies[FINE_TUNED] == ""
    assert exchange.notes[FINE_TUNED] == ["stopped before the end of the reply"]


def test_the_conversation_downloads_as_a_training_record(chat_model, tmp_path):
    """The page's download is one sharegpt record that the training data reader reads back to the same turns."""
    import json

    from fora.infer.chat import BASE, FINE_TUNED, Exchange, conversation_record
    from support import turns_of

    history = [Exchange("hi", {FINE_TUNED: "line one\nline two", BASE: "other"}),
               Exchange("broken", {FINE_TUNED: ""}, errors={FINE_TUNED: "RuntimeError: x"}),
               Exchange("and now?", {FINE_TUNED: "done"})]
    record = conversation_record(history, "Be brief.")
    path = tmp_path / "conversation.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert turns_of(path) == [("Be brief.", [("hi", "line one\nline two"), ("and now?", "done")])]


def test_a_second_adapter_answers_side_by_side_as_it_answers_alone(chat_model, adapter, tmp_path):
    """--compare_dir: the compared side's reply is the second adapter's own (loaded alone), the fine-tuned
    side's stays the first adapter's, and both share one base in memory."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from fora.args import ChatArguments
    from fora.errors import UserError
    from fora.infer.chat import COMPARED, FINE_TUNED, ChatModel, Exchange, Settings

    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    weights = load_file(str(other / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    save_file({k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in weights.items()}, str(other / "adapter_model.safetensors"))
    settings = Settings(12, 1.0, 1.0)
    both = ChatModel(ChatArguments(model_dir=str(adapter), compare_dir=str(other)))
    compared = reply(both, [], Exchange("hi"), COMPARED, settings)
    assert compared == reply(ChatModel(ChatArguments(model_dir=str(other))), [], Exchange("hi"), FINE_TUNED, settings)
    assert reply(both, [], Exchange("hi"), FINE_TUNED, settings) == reply(chat_model, [], Exchange("hi"), FINE_TUNED, settings)
    assert compared != reply(chat_model, [], Exchange("hi"), FINE_TUNED, settings)
    with pytest.raises(UserError, match="not an adapter folder"):
        ChatModel(ChatArguments(model_dir=str(adapter), compare_dir=str(tmp_path)))
