"""Chat with the fine-tuned model in a terminal.

    python cli_demo.py                                         # the embedded default model
    python cli_demo.py --model_dir output/demo/adapter         # the demo's fine-tune
    python cli_demo.py --model_dir output/demo/adapter --side_by_side

Type a message and press Enter; the reply is printed as it is generated. `clear` starts a new
conversation, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply and keeps what it had said. The same
flags as web_demo.py: predict_fora.py's model flags and the chat's own (`--help`, fora/args/chat.py).
"""

from fora.cli import chat

if __name__ == "__main__":
    chat()
