"""Chat with the fine-tuned model in a terminal.

    python cli_demo.py                                         # the embedded default model
    python cli_demo.py --model_dir output/demo/adapter         # the demo's fine-tune
    python cli_demo.py --model_dir output/demo/adapter --side_by_side

Type a message and press Enter; the reply is printed as it is generated. `clear` starts a new
conversation, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply and keeps what it had said. The same
flags as web_demo.py: predict_fora.py's model flags and the chat's own (`--help`, config.ChatArguments).
"""

import readline  # noqa: F401  (line editing and history for input())

from config import ChatArguments, parse_args
from fora.errors import UserError, exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((ChatArguments,), argv)
    from fora.chat import BASE, FINE_TUNED, ChatModel, Exchange, Settings

    model = ChatModel(args)
    if args.side_by_side and not model.has_adapter:
        raise UserError("--side_by_side needs --model_dir ADAPTER: the base side is the model with the adapter off")
    sides = [FINE_TUNED, BASE] if args.side_by_side else [FINE_TUNED]
    labels = {FINE_TUNED: "Fine-tuned", BASE: "Base"} if args.side_by_side else {FINE_TUNED: "Assistant"}
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
            for note in exchange.notes.get(side, []):
                print(f"({note})")
            if stopped:
                break
        history.append(exchange)


if __name__ == "__main__":
    exit_on_user_error(main)
