"""The chat page (Streamlit), what web_demo.py runs: `streamlit run web_demo.py -- FLAGS`.

The model loads once per server process and serves every tab, one reply at a time: a tab whose reply
waits for another tab's says so, and its Stop cancels the wait. While a reply streams, the message box's
send button is a stop button; anything that reruns the page mid-reply (a sidebar change, Stop) keeps what
was generated, marked stopped. Replies show as the model wrote them (line breaks kept, no Markdown).
"""

import json
import sys

import streamlit as st

from fora.args import ChatArguments, parse_args
from fora.errors import UserError
from fora.infer.chat import BASE, COMPARED, FINE_TUNED, ChatModel, Exchange, Settings, conversation_record

WAITING = "Waiting for the model: another conversation's reply is being generated (Stop cancels)"


@st.cache_resource(show_spinner="Loading the model...")
def load_model(argv: tuple[str, ...]) -> ChatModel:
    """One model per server process and set of flags; a failed load is not cached, so a fix is picked up."""
    (args,) = parse_args((ChatArguments,), list(argv))
    return ChatModel(args)


def sidebar(args: ChatArguments, model: ChatModel) -> tuple[Settings, bool]:
    """The reply settings and whether to answer side by side."""
    with st.sidebar:
        st.header("FoRA chat")
        st.caption(model.description)
        longest = min(model.context_length or 4096, 4096)
        max_new_tokens = st.slider("Max new tokens", 1, max(longest, args.max_new_tokens), args.max_new_tokens, key="max_new_tokens")
        temperature = st.slider(
            "Temperature", 0.0, max(2.0, args.temperature), args.temperature, 0.05, key="temperature",
            help="0 = greedy: always the most likely token.",
        )
        top_p = st.slider("Top-p", 0.05, 1.0, args.top_p, 0.05, key="top_p")
        system = st.text_area("System prompt", args.system or "", key="system", help="Empty: the template's own, if any.")
        side_by_side = st.toggle(
            "Side by side with the base", args.side_by_side and model.has_adapter, key="side_by_side",
            disabled=not model.has_adapter,
            help="Answer every message twice: with the adapter on and switched off (needs --model_dir ADAPTER).",
        )
    return Settings(max_new_tokens, temperature, top_p, system or None), side_by_side


def conversation_buttons(history: list[Exchange], settings: Settings) -> None:
    """Under the settings, drawn once the page holds the whole conversation (the download carries it all)."""
    with st.sidebar:
        st.button("Regenerate the last reply", on_click=lambda: st.session_state.update(regenerate_last=True), key="regenerate",
                  disabled=not history)
        st.download_button(
            "Download the conversation", json.dumps(conversation_record(history, settings.system), ensure_ascii=False) + "\n",
            file_name="conversation.jsonl", mime="application/json", key="download", disabled=not history,
            help="One training record (sharegpt format) holding this conversation: a good one becomes training data.",
        )
        st.button("Clear the conversation", on_click=lambda: st.session_state.update(history=[]), key="clear")


def labels(model: ChatModel) -> dict[str, str]:
    return {FINE_TUNED: "Fine-tuned (adapter on)", BASE: "Base (adapter off)", COMPARED: f"Compared ({model.compared})"}


def show(exchange: Exchange, sides: list[str], model: ChatModel, answer: tuple[list[Exchange], Settings] | None = None):
    """The message and its replies, one column per side; with `answer`, the replies are generated now."""
    with st.chat_message("user"):
        st.text(exchange.user)
    columns = st.columns(len(sides)) if len(sides) > 1 else [st.container()]
    for side, column in zip(sides, columns):
        with column, st.chat_message("assistant"):
            if len(sides) > 1:
                st.caption(labels(model)[side])
            shown = st.empty()
            try:
                if answer:
                    earlier, settings = answer
                    stream(shown, model.respond(earlier, exchange, side, settings), exchange)
            finally:  # stopped too: Streamlit stops a page once, so the reply's end and its notes still show
                if side in exchange.errors:
                    shown.error(f"error: {exchange.errors[side]}")
                else:
                    shown.text(exchange.replies.get(side) or "(no reply)")
                for note in exchange.notes.get(side, []):
                    st.caption(note)


def stream(shown, reply, exchange: Exchange) -> None:
    """Show the reply as it is generated, as written; every piece (an empty one while nothing came) is a
    point where Streamlit can stop the page. Stopped or rerun, generation stops and the text so far stays."""
    text = ""
    try:
        for piece in reply:
            text += piece
            if text or not exchange.waiting:
                shown.text(text)
            else:
                shown.caption(WAITING)
    finally:
        reply.close()


def main():
    st.set_page_config(page_title="FoRA chat", layout="wide")
    try:
        (args,) = parse_args((ChatArguments,), sys.argv[1:])
        model = load_model(tuple(sys.argv[1:]))
    except UserError as error:
        st.error(f"error: {error}")
        st.stop()
    settings, side_by_side = sidebar(args, model)
    history: list[Exchange] = st.session_state.setdefault("history", [])
    sides = [FINE_TUNED] + ([COMPARED] if model.compared else []) + ([BASE] if side_by_side else [])
    if st.session_state.pop("regenerate_last", False) and history:
        history[-1].settle()
        message = history.pop().user
    else:
        message = None
    for exchange in history:
        # With fast reruns Streamlit starts this run while the cut-short one is still winding down.
        exchange.settle()
        show(exchange, [side for side in (FINE_TUNED, COMPARED, BASE) if side in exchange.replies], model)
    message = st.chat_input("Your message", submit_mode="stop") or message
    if message:
        exchange = Exchange(message)
        history.append(exchange)  # before streaming, so an interrupted reply is kept with its message
        show(exchange, sides, model, (history[:-1], settings))
    conversation_buttons(history, settings)

