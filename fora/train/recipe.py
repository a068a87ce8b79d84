"""The training recipe: what train_lora.py and train_qlora.py run, one process or under deepspeed/torchrun.

    parse the flags → where to write and resume from → tokenizer, template, data → the memory estimate (it decides
    --gradient_checkpointing auto) → model and adapter → train (SupervisedTrainer; out of memory is one line) → save
    the adapter, the run record, the results and the loss curve
"""

import math
import os
import shutil
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer import TRAINER_STATE_NAME

from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.data.collator import PaddingCollator
from fora.data.dataset import build_dataset
from fora.data.templates import get_template
from fora.errors import UserError
from fora.io import refuse_earlier_output, write_json
from fora.memory.decide import RunMemory
from fora.models.load import load_model, resolve_model_path
from fora.models.tokenizer import load_tokenizer, save_base_tokenizer
from fora.precision import keep_trainable_in_float32
from fora.run import RunRecord
from fora.train.callbacks import LossPlotCallback, plot_loss
from fora.train.checkpoints import last_checkpoint
from fora.train.trainer import SupervisedTrainer
from fora.tuners.attach import INITIAL_ADAPTER, attach_adapter, count_parameters, keep_initial_adapter
from fora.tuners.methods import check_method, method_config

PREVIOUS_RUN_MARKERS = ("adapter_config.json", "fora_run.json", "train_results.json", "config.json", "checkpoint-*")
# What --overwrite_output_dir removes before training: the previous run's checkpoints (which resume auto or
# --save_total_limit would otherwise pick) and what a killed save left. Its final adapter stays until the new
# one replaces it whole, so a run that fails before then loses nothing.
PREVIOUS_CHECKPOINTS = ("checkpoint-*", ".tmp-*")
ZERO_BUCKET_LIMIT = int(5e8)  # DeepSpeed's own default bucket size, in elements


def main(argv: list[str] | None = None, default_quantization_bit: int | None = None) -> None:
    """Train as the flags say; `default_quantization_bit` is train_qlora.py's 4."""
    model_args, data_args, finetuning_args, training_args = parse_args(
        (ModelArguments, DataArguments, FinetuningArguments, TrainArguments), argv
    )
    if model_args.quantization_bit is None:
        model_args.quantization_bit = default_quantization_bit
    check_method(finetuning_args, model_args.quantization_bit, training_args.gradient_checkpointing is True, bool(training_args.deepspeed))
    training_args.precision.report()
    dtype = training_args.precision.torch_dtype

    refuse_data_parallel(torch.cuda.device_count(), int(os.environ.get("WORLD_SIZE", "1")))
    training_args.device  # noqa: B018 -- joins the launcher's process group now, so ranks know who they are
    is_main = training_args.process_index == 0
    log = print if is_main else (lambda *_: None)
    output_dir = Path(training_args.output_dir)

    # 1. Where to write, and where to resume from.
    resume = training_args.resume_from_checkpoint
    if resume in ("auto", "True", "true"):
        resume = last_checkpoint(output_dir)
        if resume is None:
            log(f"--resume_from_checkpoint: no checkpoint in {output_dir} yet; starting from the beginning")
    elif resume and not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    elif resume and not Path(resume, TRAINER_STATE_NAME).is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: an incomplete checkpoint (no {TRAINER_STATE_NAME})")
    if resume and finetuning_args.init_lora_weights in ("pissa", "olora"):
        raise UserError(f"--resume_from_checkpoint with --init_lora_weights {finetuning_args.init_lora_weights}: its "
                        "checkpoints hold the adapter converted for prediction, which training cannot continue from")
    if resume:
        log(f"Resuming from {resume}")
    previous = refuse_earlier_output(output_dir, PREVIOUS_RUN_MARKERS, training_args.overwrite_output_dir or bool(resume),
                                     " or --resume_from_checkpoint auto to continue it")

    # 2. Tokenizer, prompt template, data.
    if not data_args.train_file:
        raise UserError("--train_file (or --dataset_dir with --dataset) is required")
    model_path = resolve_model_path(model_args.model_name_or_path)
    if Path(model_path).exists() and Path(model_path).resolve() == output_dir.resolve():
        raise UserError(f"--output_dir {output_dir}: is the base model's folder; choose another folder")
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    template = get_template(tokenizer, data_args.template)
    log(f"Prompt template: {template.name}")
    train_dataset = build_dataset(data_args.train_file, tokenizer, template, data_args, training_args.main_process_first, log)
    eval_dataset = None
    if data_args.validation_file:
        eval_dataset = build_dataset(
            data_args.validation_file, tokenizer, template, data_args, training_args.main_process_first, log
        )
        if training_args.eval_strategy == "no":
            training_args.eval_strategy = "steps"
            training_args.eval_steps = training_args.eval_steps or training_args.logging_steps
    log(f"Training records: {len(train_dataset)}" + (f", validation records: {len(eval_dataset)}" if eval_dataset else ""))

    # 3. The run's memory estimate: it decides --gradient_checkpointing auto, and words an out-of-memory error.
    memory = RunMemory(model_args, data_args, finetuning_args, training_args, train_dataset)
    if training_args.gradient_checkpointing == "auto":
        training_args.use_gradient_checkpointing(memory.gradient_checkpointing(log))

    # 4. Model and adapter, seeded so the same flags give the same adapter.
    model = load_model(
        model_path, dtype, model_args.trust_remote_code, model_args.quantization_bit,
        unmap_freed_memory=model_args.unmap_freed_memory,
        config_overrides=method_config(finetuning_args, model_path, model_args.trust_remote_code),
    )
    if model_args.quantization_bit:
        log(f"Base model loaded in {model_args.quantization_bit}-bit "
            f"({'NF4, double quantization' if model_args.quantization_bit == 4 else 'LLM.int8'}), compute dtype {dtype}")
    set_seed(training_args.seed)
    model = attach_adapter(model, finetuning_args, training_args.gradient_checkpointing, planned_steps(len(train_dataset), training_args))
    initial_adapter = None
    if finetuning_args.init_lora_weights in ("pissa", "olora"):
        initial_adapter = str(output_dir / INITIAL_ADAPTER)
        with training_args.main_process_first(desc="saving the initial adapter", local=False):
            if is_main:
                keep_initial_adapter(model, Path(initial_adapter))
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if keep_trainable_in_float32(model, training_args.precision, bool(training_args.deepspeed)):
        log("--fp16: the trained parameters are kept in float32 (the gradient scaler unscales float32 only)")
    trainable, total = count_parameters(model)
    log(f"Fine-tuning: {finetuning_args.finetuning_type}; trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.4f}%)")
    if training_args.deepspeed:
        size_zero_buckets(training_args.hf_deepspeed_config.config, model)

    # 5. Train, into a folder cleared of any previous run only now that data and model have loaded.
    if previous and not resume:
        with training_args.main_process_first(desc="clearing the previous run", local=False):
            if is_main:
                removed = clear_previous_run(output_dir, Path(training_args.logging_dir))
                log(f"--overwrite_output_dir: removed {removed} checkpoints and logs of the previous run from {output_dir}")
    record = RunRecord.of_training(model_path, model_args, data_args, finetuning_args, template.name)
    training_args.remove_unused_columns = False  # the collator picks its columns; `length` feeds length grouping
    # SupervisedTrainer stops at the first NaN/inf loss; the filter would only average such losses away,
    # reading every micro-batch's loss on the host to do it.
    training_args.logging_nan_inf_filter = False
    trainer = SupervisedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PaddingCollator.for_this_machine(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[LossPlotCallback()],
        run_record=record,
        loraplus_lr_ratio=finetuning_args.loraplus_lr_ratio,
        initial_adapter=initial_adapter,
    )
    with memory.out_of_memory_in_one_line("while training"):
        result = trainer.train(resume_from_checkpoint=resume or None)

    # 6. Save the adapter (or model), what training decided, and the results.
    trainer.save_model(str(output_dir))
    if is_main:  # the base's tokenizer files as they are: re-saved, some encode differently (see models/tokenizer.py)
        save_base_tokenizer(model_path, output_dir, model_args.trust_remote_code)
    real_tokens, batch_tokens = trainer.trained_tokens()
    if is_main:
        record.save(output_dir)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results = {
            **result.metrics,
            "global_step": result.global_step,
            "num_input_tokens_seen": real_tokens,  # this run's, without padding
            "pad_fraction": round(1 - real_tokens / max(batch_tokens, 1), 4),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "final_loss": losses[-1] if losses else result.training_loss,
            # this process's peak on its GPU (torch's allocator), for the memory estimate to be compared with
            "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        write_json(output_dir / "train_results.json", results)
        plot_loss(trainer.state.log_history, output_dir / "training_loss.png")
        log(f"{'Adapter' if (output_dir / 'adapter_config.json').is_file() else 'Model'} saved to {output_dir}")
        log(f"Padding: {100 * results['pad_fraction']:.1f}% of the training batches' tokens")
        log(f"Loss curve: {output_dir / 'training_loss.png'}; TensorBoard logs: {training_args.logging_dir}")
    if torch.distributed.is_initialized():
        # Torn down by the interpreter's exit instead, the group's threads can abort a process that has saved
        # everything ("terminate called without an active exception"), failing the launcher's run.
        torch.distributed.destroy_process_group()


def clear_previous_run(output_dir: Path, logging_dir: Path) -> int:
    """Remove an earlier run's checkpoints (and TensorBoard logs) from `output_dir`; returns how many."""
    stale = {path for pattern in PREVIOUS_CHECKPOINTS for path in output_dir.glob(pattern)}
    if logging_dir.is_dir() and output_dir.resolve() in logging_dir.resolve().parents:
        stale.add(logging_dir)  # its TensorBoard logs would mix the two runs' curves
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return len(stale)


def refuse_data_parallel(gpus: int, processes: int) -> None:
    """One process on a machine with several GPUs would fall into torch's DataParallel (a batch split across
    the GPUs behind the sampler's back) or, on a 4-bit base, run every GPU's batch on the first one."""
    if gpus > 1 and processes == 1:
        raise UserError(
            f"this machine has {gpus} GPUs and the run is one process: launch it with torchrun --nproc_per_node {gpus} "
            f"or deepspeed --num_gpus {gpus}, or give it one GPU with CUDA_VISIBLE_DEVICES=0"
        )


def size_zero_buckets(config: dict, model) -> None:
    """DeepSpeed ZeRO's communication buckets, where the config says "auto": as large as what trains (every
    trainable element in one bucket), never smaller than its largest tensor, at most DeepSpeed's own 5e8. Fixed
    at 5e8 elements, the buckets (two with overlap_comm) would take gigabytes per GPU for an adapter of a few MB."""
    zero = config.get("zero_optimization", {})
    trainable = [param.numel() for param in model.parameters() if param.requires_grad]
    size = max(max(trainable, default=1), min(sum(trainable), ZERO_BUCKET_LIMIT))
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = size


def planned_steps(records: int, training_args) -> int:
    """The optimizer steps the run will take: --max_steps, else the epochs over global batches (as the Trainer
    counts them, a short last batch included)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    global_batch = training_args.train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    return math.ceil(training_args.num_train_epochs * math.ceil(records / global_batch))
