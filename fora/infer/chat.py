"""The conversation shared by web_demo.py and cli_demo.py: load once, render, trim, stream.

`ChatModel` loads a base model plus an adapter (left unmerged, so it can be switched off), a merged
model or the base alone, exactly as predict_fora.py does. `ChatModel.respond` turns the history and
a new message into the prompt with the template and cutting rules of training and prediction
(`fora.infer.generate.fit_turns`), leaves out the oldest turns when the conversation no longer fits, and
streams the reply as text while writing it into the `Exchange`, so a reply that is stopped halfway
(the page reran, Ctrl-C) keeps what was generated.

Side by side, one base stays in memory: the fine-tuned reply runs with the adapter on, the base
reply inside PEFT's `disable_adapter()`. Each side continues its own conversation; a turn that side
did not answer (side by side switched on later, or a reply stopped before it) shows it the reply
the user saw.
"""

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from fora.data.formats import Conversation
from fora.data.templates import get_template
from fora.infer import generate
from fora.models.inference import describe_loaded, load_inference_model

FINE_TUNED, BASE = "fine-tuned", "base"  # who answers: the model as loaded, or its base with the adapter off


def settled_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Exchange:
    """One message and the replies to it, by who answered."""

    user: str
    replies: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # what was left out, cut or stopped, by who
    _stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _settled: threading.Event = field(default_factory=settled_event, repr=False, compare=False)

    def settle(self) -> None:
        """Stop a reply still being generated (the page run that showed it was cut short, and its
        thread is still winding down) and wait until the reply and its notes are final."""
        self._stop.set()
        self._settled.wait()

    def reply_seen_by(self, who: str) -> str:
        """The reply `who`'s conversation continues from: its own, else the one the user saw."""
        return self.replies.get(who) or self.replies.get(FINE_TUNED, "")


@dataclass
class Settings:
    """How one reply is generated (the web page's sidebar, the terminal's flags)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    system: str | None = None


class ChatModel:
    """A model, its tokenizer and template, loaded once and shared by every conversation."""

    def __init__(self, args):
        """`args` holds predict_fora.py's model flags (fora.args.ChatArguments)."""
        self.model, self.tokenizer, info = load_inference_model(
            args.model_dir, args.ori_model_dir, args.torch_dtype, args.trust_remote_code, args.quantization_bit,
            merge=False,  # a merged adapter cannot be switched off for the base's side
        )
        self.template = get_template(self.tokenizer, args.template or info.get("template"))
        self.max_source_length, self.max_target_length = generate.inference_lengths(args.max_source_length, info)
        text_config = self.model.config.get_text_config(decoder=True)
        self.context_length = getattr(text_config, "max_position_embeddings", None)
        self.has_adapter = info["model_kind"] == "adapter"
        self.description = f"{describe_loaded(args.model_dir, info)}, template {self.template.name}"
        # One model serves every browser tab: a reply holds it, so the base side's switched-off adapter
        # is never seen by another conversation's fine-tuned reply.
        self.lock = threading.Lock()

    def prompt(self, history: list[Exchange], message: str, who: str, settings: Settings) -> tuple[list[int], list[str]]:
        """Prompt ids for the reply to `message`, and notes on what had to be left out or cut.

        The conversation keeps to training's lengths (each message cut to max_source_length tokens, each earlier
        reply to the trained max_target_length, at most their sum in all) and leaves room in the model's
        context for `settings.max_new_tokens`; the oldest turns go first.
        """
        turns = [(e.user, e.reply_seen_by(who)) for e in history] + [(message, None)]
        first = 0
        while True:
            conversation = Conversation("chat", settings.system or None, turns[first:])
            ids, cut, left_out = generate.fit_turns(
                self.tokenizer, self.template, conversation, self.max_source_length, self.max_target_length
            )
            first += left_out
            fits = self.context_length is None or len(ids) + settings.max_new_tokens <= self.context_length
            if fits or first == len(turns) - 1:
                break
            first += 1
        notes = []
        if first:
            notes.append(f"left out the {first} oldest turn{'s' if first > 1 else ''} to fit the context")
        if cut:
            notes.append(
                f"cut to fit: messages to {self.max_source_length} tokens (--max_source_length), "
                f"earlier replies to {self.max_target_length}"
            )
        return ids, notes

    def respond(self, history: list[Exchange], exchange: Exchange, who: str, settings: Settings) -> Iterator[str]:
        """Stream `who`'s reply to `exchange.user` as text pieces, keeping the text so far in `exchange`.

        Closing the generator early (the page reran, Ctrl-C) or `exchange.settle()` stops generation; what
        was generated stays in `exchange.replies[who]`, with a note.
        """
        if who == BASE and not self.has_adapter:
            raise ValueError("the base side needs an adapter to switch off")
        prompt, notes = self.prompt(history, exchange.user, who, settings)
        exchange.notes[who] = notes
        exchange.replies[who] = ""
        budget = settings.max_new_tokens
        if self.context_length:
            budget = max(1, min(budget, self.context_length - len(prompt)))
        config = generate.generation_config(
            self.tokenizer, self.template.stop_token_ids(self.tokenizer), settings.temperature > 0,
            temperature=settings.temperature, top_p=settings.top_p,
        )
        config = generate.decodable_only(config, self.model, self.tokenizer)
        config.max_new_tokens = budget
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []

        def run():
            adapter_off = self.model.disable_adapter() if who == BASE else nullcontext()
            try:
                with self.lock, adapter_off, torch.inference_mode():
                    device = next(self.model.parameters()).device
                    self.model.generate(
                        input_ids=torch.tensor([prompt], device=device),
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_WhenSet(stop)]),
                    )
            except BaseException as error:  # handed to the reading side, which raises it
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="chat-reply", daemon=True)
        exchange._stop = stop
        exchange._settled.clear()
        worker.start()
        text, complete = "", False
        try:
            for piece in streamer:
                text += piece
                exchange.replies[who] = text.strip()
                yield piece
            complete = not stop.is_set()
        finally:
            stop.set()
            worker.join()
            if not complete:
                exchange.notes[who].append("stopped before the end of the reply")
            exchange._settled.set()
        if failure:
            raise failure[0]


class _WhenSet(StoppingCriteria):
    """Stops generation once `event` is set (the reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
