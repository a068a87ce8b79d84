"""The run record: what training decided, saved beside every adapter and checkpoint, read by everything after.

`fora_run.json` is to this toolkit what `adapter_config.json` is to PEFT: training writes it
(atomically) into every `checkpoint-N` and into the final folder, and prediction, merging, chat and
federated rounds load it, so they need only the adapter folder to load the base as it was trained.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fora.args.method import FinetuningType
from fora.errors import UserError
from fora.io import read_json, write_json
from fora.precision import DTYPE_NAMES, DtypeName

RUN_FILE = "fora_run.json"


@dataclass
class RunRecord:
    base_model: str  # the base's folder (absolute) or hub id
    finetuning_type: FinetuningType
    torch_dtype: DtypeName  # what the base was loaded in (the compute dtype under a 4/8-bit base)
    quantization_bit: int | None = None
    trust_remote_code: bool = False  # recorded only: loading remote code again needs the user's flag
    template: str | None = None
    data_format: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    max_source_length: int | None = None
    max_target_length: int | None = None
    federated: dict | None = None  # train_federated.py: the round and the federation's settings

    @classmethod
    def of_training(cls, model_path: str, model_args, data_args, finetuning_args, template_name: str, **extra) -> "RunRecord":
        """The record of a training run from its parsed flags (fora.args), the base it loaded and its template."""
        return cls(
            base_model=str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
            finetuning_type=finetuning_args.finetuning_type,
            torch_dtype=model_args.torch_dtype,
            quantization_bit=model_args.quantization_bit,
            trust_remote_code=model_args.trust_remote_code,
            template=template_name,
            data_format=data_args.data_format,
            prompt_column=data_args.prompt_column,
            response_column=data_args.response_column,
            max_source_length=data_args.max_source_length,
            max_target_length=data_args.max_target_length,
            **extra,
        )

    def save(self, folder: str | Path) -> None:
        """Write FOLDER/fora_run.json atomically: a reader sees the old record or the new one."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / RUN_FILE, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> "RunRecord | None":
        """The record in FOLDER, or None if it has none.

        A `checkpoint-N` written before checkpoints carried their own record finds its run's one level up.
        """
        folder = Path(folder)
        path = folder / RUN_FILE
        if not path.is_file() and folder.name.startswith("checkpoint-"):
            path = folder.parent / RUN_FILE
        if not path.is_file():
            return None
        values = read_json(path)
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a JSON object (the run record)")
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("base_model", "finetuning_type") if not values.get(name)]
        if missing:
            raise UserError(f"{path}: field {missing[0]!r} is missing")
        values = {key: value for key, value in values.items() if key in known}
        values["torch_dtype"] = values.get("torch_dtype") if values.get("torch_dtype") in DTYPE_NAMES else "float32"
        return cls(**values)
