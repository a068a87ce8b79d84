"""The entry points: what the root scripts (train_lora.py, predict_fora.py, ...) and the fora-* console
scripts run. Each parses its flags through the package and turns a user's mistake into one `error:` line
and exit code 2 (fora.errors.exit_on_user_error); anything else is a bug and keeps its traceback.

    fora-train / train_lora.py            fora.train.recipe.main
    fora-train-qlora / train_qlora.py     the same, base in 4-bit by default
    fora-predict / predict_fora.py        fora.infer.predict.main
    fora-merge / merge_lora.py            fora.merge.main
    fora-chat / cli_demo.py               fora.infer.terminal.main (the web page: streamlit run web_demo.py)
    fora-federated / train_federated.py   fora.federated.simulation.main
    fora-estimate / estimate_memory.py    fora.memory.report.main
"""

import sys

from fora.errors import UserError, exit_on_user_error

PAGED_OPTIMIZER = "paged_adamw_8bit"


def train() -> None:
    from fora.train.recipe import main

    exit_on_user_error(main)


def train_qlora() -> None:
    """train_lora.py with `--quantization_bit 4` by default; one process on CUDA takes paged AdamW unless an
    optimizer is chosen."""
    import torch

    from fora.train.recipe import main

    argv = with_paged_optimizer(sys.argv[1:], torch.cuda.is_available())
    exit_on_user_error(lambda: main(argv, default_quantization_bit=4))


def with_paged_optimizer(argv: list[str], cuda: bool) -> list[str]:
    """`argv` plus `--optim paged_adamw_8bit` (the QLoRA paper's, its states paged out under memory pressure) on
    CUDA, unless the flags or the argument file choose an optimizer or DeepSpeed: under ZeRO the Trainer's AdamW,
    whose states ZeRO partitions across the GPUs, as LLaMA-Factory's QLoRA + DeepSpeed examples run it (DeepSpeed
    calls bitsandbytes' optimizers untested and its fp16 loss scaling has not been shown with them)."""
    from fora.args.parsing import argument_file_flags, is_argument_file

    given = list(argv)
    if is_argument_file(argv):
        try:
            given += argument_file_flags(argv[0])
        except UserError:
            return argv  # the argument file is broken; parse_args reports it
    chosen = any(arg.split("=", 1)[0] in ("--optim", "--deepspeed") for arg in given)
    return argv if not cuda or chosen else [*argv, "--optim", PAGED_OPTIMIZER]


def predict() -> None:
    from fora.infer.predict import main

    exit_on_user_error(main)


def merge() -> None:
    from fora.merge import main

    exit_on_user_error(main)


def chat() -> None:
    from fora.infer.terminal import main

    exit_on_user_error(main)


def federated() -> None:
    from fora.federated.simulation import main

    exit_on_user_error(main)


def estimate_memory() -> None:
    from fora.memory.report import main

    exit_on_user_error(main)
