"""Every command-line argument, one module per concern, with its documentation as `help` text (`--help` of
each script prints it, choices included).

    model      ModelArguments       the base model and how it loads
    data       DataArguments        training data, format, template, lengths
    method     FinetuningArguments  the fine-tuning method and its adapter
    training   TrainArguments       HF TrainingArguments plus the seeds' flags
    predict    PredictArguments     predict_fora.py
    merge      MergeArguments       merge_lora.py
    chat       ChatArguments        web_demo.py, cli_demo.py
    federated  FederatedArguments   train_federated.py
"""

from fora.args.chat import ChatArguments
from fora.args.data import DEFAULT_LENGTH, DataArguments, registered_dataset
from fora.args.federated import FederatedArguments
from fora.args.merge import MergeArguments
from fora.args.method import FinetuningArguments
from fora.args.model import ModelArguments
from fora.args.parsing import parse_args
from fora.args.predict import PredictArguments
from fora.args.training import TrainArguments

__all__ = [
    "DEFAULT_LENGTH", "ChatArguments", "DataArguments", "FederatedArguments", "FinetuningArguments", "MergeArguments",
    "ModelArguments", "PredictArguments", "TrainArguments", "parse_args", "registered_dataset",
]
