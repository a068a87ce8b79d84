"""Every command-line argument of the scripts, by the name users import it under. The classes live in fora/args/
(one module per concern); `python train_lora.py --help` (predict_fora.py, merge_lora.py, ...) prints them.

    from config import ModelArguments, DataArguments, FinetuningArguments, TrainArguments, parse_args
"""

from fora.args import (
    ChatArguments,
    DataArguments,
    FederatedArguments,
    FinetuningArguments,
    MergeArguments,
    ModelArguments,
    PredictArguments,
    TrainArguments,
    parse_args,
)

__all__ = [
    "ChatArguments", "DataArguments", "FederatedArguments", "FinetuningArguments", "MergeArguments", "ModelArguments",
    "PredictArguments", "TrainArguments", "parse_args",
]
