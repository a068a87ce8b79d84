"""The chat in a terminal, what cli_demo.py runs (and fora-chat): type a message, the reply prints as it
is generated; `clear` starts over, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply and keeps what it had said."""

import readline  # noqa: F401  (line editing and history for input())

from fora.args import ChatArguments, parse_args
from fora.errors import UserError
from fora.infer.chat import BASE, COMPARED, FINE_TUNED, ChatModel, Exchange, Settings


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((ChatArguments,), argv)
    model = ChatModel(args)
    if args.side_by_side and not model.has_adapter:
        raise UserError("--side_by_side needs --model_dir ADAPTER: the base side is the model with the adapter off")
    sides = [FINE_TUNED] + ([COMPARED] if model.compared else []) + ([BASE] if args.side_by_side else [])
    labels = {FINE_TUNED: "Fine-tuned" if len(sides) > 1 else "Assistant", BASE: "Base", COMPARED: f"Compared ({model.compared})"}
    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.system)
    print(f"Chatting with {model.description}.")
    print("Type a message; 'clear' starts over, 'exit' quits, Ctrl-C stops a reply.")
    history: list[Exchange] = []
    while True:
        try:
            message = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if message == "exit":
            break
        if message == "clear":
            history.clear()
            print("(conversation cleared)")
            continue
        if not message:
            continue
        exchange = Exchange(message)
        for side in sides:
            print(f"\n{labels[side]}: ", end="", flush=True)
            stopped = False
            try:
                for piece in model.respond(history, exchange, side, settings):
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:  # the reply so far is kept, marked stopped
                stopped = True
            print()
            if side in exchange.errors:
                print(f"(error: {exchange.errors[side]})")
            for note in exchange.notes.get(side, []):
                print(f"({note})")
            if stopped:
                break
        history.append(exchange)

