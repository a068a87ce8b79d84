"""The conversation shared by web_demo.py and cli_demo.py: load once, render, trim, stream.

`ChatModel` loads a base model plus an adapter (left unmerged, so it can be switched off), a merged
model or the base alone, exactly as predict_fora.py does. `ChatModel.respond` turns the history and
a new message into the prompt with the template and cutting rules of training and prediction
(`fora.infer.generate.fit_turns`), leaves out the oldest turns when the conversation no longer fits, and
streams the reply as text while writing it into the `Exchange`, so a reply that is stopped halfway
(the page reran, Ctrl-C) keeps what was generated.

Side by side, one base stays in memory: the fine-tuned reply runs with the adapter on, the base
reply inside PEFT's `disable_adapter()`, and a second adapter (--compare_dir, on the same base) as a
second PEFT adapter switched in for its reply. Each side continues its own conversation; a turn that
side did not answer (side by side switched on later, or a reply stopped before it) shows it the reply
the user saw. A reply that failed shows its error in one line and stays out of every later prompt.

One model serves every conversation (every browser tab), one reply at a time: a reply waits for the one
being generated, and stops waiting when it is stopped.
"""

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from fora.data.formats import Conversation
from fora.data.templates import get_template
from fora.errors import UserError
from fora.infer import generate
from fora.models.inference import describe_loaded, load_inference_model

# Who answers: the model as loaded, its base with the adapter off, or the --compare_dir adapter in its place.
FINE_TUNED, BASE, COMPARED = "fine-tuned", "base", "compared"

POLL_SECONDS = 0.1  # how often a reply waiting for the model or for its next words checks it was stopped


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
    errors: dict[str, str] = field(default_factory=dict)  # a reply that failed: its error in one line, by who
    waiting: bool = False  # a reply is waiting for the model, which another conversation's reply holds
    _stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _settled: threading.Event = field(default_factory=settled_event, repr=False, compare=False)

    def settle(self) -> None:
        """Stop a reply still being generated (the page run that showed it was cut short, and its
        thread is still winding down) and wait until the reply and its notes are final."""
        self._stop.set()
        self._settled.wait()

    def reply_seen_by(self, who: str) -> str | None:
        """The reply `who`'s conversation continues from: its own, else the one the user saw; None when the
        reply failed (the exchange stays out of the prompt)."""
        for side in (who, FINE_TUNED):
            if side not in self.errors and self.replies.get(side):
                return self.replies[side]
        return None if who in self.errors or FINE_TUNED in self.errors else self.replies.get(FINE_TUNED, "")


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
        self.compared = None  # the --compare_dir adapter's folder, loaded as a second adapter on the same base
        if args.compare_dir:
            self.compared = load_compared_adapter(self.model, args.model_dir, args.compare_dir, info)
            self.description += f"; compared with {args.compare_dir}"
        # One model serves every browser tab: a reply holds it, so the base side's switched-off adapter
        # is never seen by another conversation's fine-tuned reply.
        self.lock = threading.Lock()

    def prompt(self, history: list[Exchange], message: str, who: str, settings: Settings) -> tuple[list[int], list[str]]:
        """Prompt ids for the reply to `message`, and notes on what had to be left out or cut.

        The conversation keeps to training's lengths (each message cut to max_source_length tokens, each earlier
        reply to the trained max_target_length, at most their sum in all) and leaves room in the model's
        context for `settings.max_new_tokens`; the oldest turns go first.
        """
        turns = [(e.user, reply) for e in history if (reply := e.reply_seen_by(who)) is not None] + [(message, None)]
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
        if who == COMPARED and not self.compared:
            raise ValueError("the compared side needs --compare_dir")
        prompt, notes = self.prompt(history, exchange.user, who, settings)
        exchange.notes[who] = notes
        exchange.replies[who] = ""
        exchange.errors.pop(who, None)
        budget = settings.max_new_tokens
        if self.context_length:
            budget = max(1, min(budget, self.context_length - len(prompt)))
        config = generate.generation_config(
            self.tokenizer, self.template.stop_token_ids(self.tokenizer), settings.temperature > 0,
            temperature=settings.temperature, top_p=settings.top_p,
        )
        config = generate.decodable_only(config, self.model, self.tokenizer)
        config.max_new_tokens = budget
        # The reader polls, so that a reply waiting for the model (or for its next words) can be stopped.
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=POLL_SECONDS)
        stop = threading.Event()

        def run():
            try:
                while not self.lock.acquire(timeout=POLL_SECONDS):
                    exchange.waiting = True
                    if stop.is_set():
                        return
                exchange.waiting = False
                try:
                    with self.side(who), torch.inference_mode():
                        device = next(self.model.parameters()).device
                        self.model.generate(
                            input_ids=torch.tensor([prompt], device=device),
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                            generation_config=config,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_WhenSet(stop)]),
                        )
                finally:
                    self.lock.release()
            except Exception as error:  # shown in the reply's place, in one line; the reply leaves the prompts
                exchange.errors[who] = " ".join(f"{type(error).__name__}: {error}".split())
            finally:
                exchange.waiting = False
                streamer.end()

        worker = threading.Thread(target=run, name="chat-reply", daemon=True)
        exchange._stop = stop
        exchange._settled.clear()
        worker.start()
        text, complete = "", False
        pieces = iter(streamer)
        try:
            while True:
                try:
                    piece = next(pieces)
                except queue.Empty:
                    yield ""  # nothing yet: the caller may stop here
                    continue
                except StopIteration:
                    break
                text += piece
                exchange.replies[who] = text.strip()
                yield piece
            complete = not stop.is_set()
        finally:
            stop.set()
            worker.join()
            if not complete and who not in exchange.errors:
                exchange.notes[who].append("stopped before the end of the reply")
            exchange._settled.set()

    def side(self, who: str):
        """The model as `who` answers: the adapter on, off (the base), or the compared adapter in its place."""
        if who == BASE:
            return self.model.disable_adapter()
        if who == COMPARED:
            return _active_adapter(self.model, COMPARED)
        return nullcontext()


@contextmanager
def _active_adapter(model, name: str):
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def load_compared_adapter(model, model_dir: str | None, compare_dir: str, info: dict) -> str:
    """Add the --compare_dir adapter to `model` (an adapter on its base) as a second adapter, COMPARED; both
    must have been trained on the same base, which stays in memory once."""
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from fora.run import RunRecord
    from fora.tuners.fora import load_fora_config

    if info["model_kind"] != "adapter":
        raise UserError(f"--compare_dir {compare_dir}: comparing needs --model_dir ADAPTER on the same base")
    weights = Path(compare_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"--compare_dir {compare_dir}: not an adapter folder (no adapter_model.safetensors)")
    record = RunRecord.load(Path(compare_dir))
    if record and Path(record.base_model).resolve() != Path(info["base_model"]).resolve():
        raise UserError(f"--compare_dir {compare_dir}: trained on {record.base_model}, not on {info['base_model']} "
                        f"(the base of --model_dir {model_dir})")
    config = load_fora_config(compare_dir) or PeftConfig.from_pretrained(compare_dir)
    model.add_adapter(COMPARED, config)
    set_peft_model_state_dict(model, load_file(str(weights)), adapter_name=COMPARED)
    model.set_adapter("default")
    model.eval()
    return compare_dir


def conversation_record(history: list[Exchange], system: str | None) -> dict:
    """The conversation as one training record in the sharegpt format (fora.data.formats), the replies the
    user saw; failed replies and their messages left out. A good conversation becomes training data."""
    turns = [(e.user, reply) for e in history if (reply := e.reply_seen_by(FINE_TUNED)) is not None]
    messages = [{"from": who, "value": text} for user, reply in turns for who, text in (("human", user), ("gpt", reply))]
    return {**({"system": system} if system else {}), "conversations": messages}


class _WhenSet(StoppingCriteria):
    """Stops generation once `event` is set (the reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
