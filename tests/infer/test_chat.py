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
