"""Trainer glue: padding collator, global batches, supervised-position loss, atomic checkpoints, loss curve, and run results."""

import inspect
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from transformers import PretrainedConfig, Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import get_length_grouped_indices, safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from fora.data import IGNORE_INDEX
from fora.errors import UserError
from fora.run import RunRecord

LOSS_CHUNK = 2048  # supervised positions per output-layer chunk
# Saves are written under this prefix and renamed into place when complete. Nothing that looks for
# checkpoints (get_last_checkpoint, sort_checkpoints, last_checkpoint) matches a name starting with it.
STAGING_PREFIX = ".tmp-"
CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
NO_BAD_STEP = torch.iinfo(torch.int64).max
logger = logging.getLogger(__name__)


class PaddingCollator:
    """Right-pads a batch; padding gets attention_mask 0 and label -100, so an EOS label equal to pad survives."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_this_machine(cls, pad_token_id: int) -> "PaddingCollator":
        """Lengths padded to a multiple of 8 on CUDA, where tensor cores want it; as they come on the CPU."""
        return cls(pad_token_id, 8 if torch.cuda.is_available() else None)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


class GlobalBatchSampler(Sampler[int]):
    """The epoch's order of records, in whole global batches (per-device batch x processes x accumulation steps).

    The order depends only on the seed, the epoch, the data and the global batch size, and every process draws
    the same one. accelerate gives process r the per-device batches r, r + P, r + 2P, ... of it, so an optimizer
    step trains on the same records whether one process or several share them. With `lengths`, records of
    similar length fill each global batch (transformers' length grouping, at the global batch size). A short
    last global batch is completed with the epoch's first records (as accelerate's even_batches does for the
    processes, here for any number of them), or left out with `drop_last`.
    """

    def __init__(self, size: int, global_batch: int, seed: int, shuffle: bool, lengths: list[int] | None, drop_last: bool):
        self.size, self.global_batch, self.seed, self.shuffle = size, global_batch, seed, shuffle
        self.lengths, self.drop_last = lengths, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        whole, rest = divmod(self.size, self.global_batch)
        return (whole + (rest > 0 and not self.drop_last)) * self.global_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is not None:
            order = get_length_grouped_indices(self.lengths, self.global_batch, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return iter((order * -(-len(self) // self.size))[: len(self)])


@dataclass(frozen=True)
class OutputLogits:
    """What a model's forward does to its output layer's result z before the loss:
    logits = softcap·tanh(scale·z / softcap), or scale·z when there is no softcap."""

    scale: float = 1.0
    softcap: float | None = None


def plain_logits(config: PretrainedConfig) -> OutputLogits:
    return OutputLogits()


def softcapped_logits(config: PretrainedConfig) -> OutputLogits:
    return OutputLogits(softcap=config.final_logit_softcapping)  # None: the model leaves its logits as they are


# The proven list: model types whose supervised-position loss tests/test_loss_parity.py shows equal to the
# model's own `model(input_ids, attention_mask, labels)` (loss and gradients, right-padded batch), each with
# what its forward applies after the output layer. Any other model gets full logits and its padding mask.
SUPERVISED_LOSS_MODELS: dict[str, Callable[[PretrainedConfig], OutputLogits]] = {
    **dict.fromkeys(
        ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "phi", "phi3", "olmo", "olmo2", "olmo3",
         "smollm3", "glm4", "starcoder2", "stablelm", "gpt_neox", "gpt2", "gpt_bigcode", "bloom", "falcon", "opt"),
        plain_logits,
    ),
    "gemma2": softcapped_logits,
    "gemma3_text": softcapped_logits,
    "cohere": lambda config: OutputLogits(scale=config.logit_scale),
    "cohere2": lambda config: OutputLogits(scale=config.logit_scale),
    "granite": lambda config: OutputLogits(scale=1 / config.logits_scaling),
}


def supervised_loss_sum(
    states: torch.Tensor, labels: torch.Tensor, head: nn.Linear | None, output: OutputLogits = OutputLogits()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the positions whose label is trained, and their count.

    `states` are the final hidden states (then `head` is the output layer and `output` what the model
    does to its result) or the logits (`head` is None). Only supervised positions go through the head,
    LOSS_CHUNK rows at a time, so the batch × length × vocabulary logits are never built (see HeadCrossEntropy).
    """
    targets = labels[:, 1:]
    positions = targets.ne(IGNORE_INDEX)
    selected = states[:, :-1][positions]
    selected_targets = targets[positions]
    if head is None:
        total = F.cross_entropy(selected.float(), selected_targets, reduction="sum")
    else:
        # Under mixed precision (--bf16/--fp16) accelerate upcasts the model's outputs to float32 after its
        # autocast forward; the head is applied here, outside that autocast, so it gets its own dtype back.
        selected = selected.to(head.weight.dtype)
        total = HeadCrossEntropy.apply(
            selected, head.weight, head.bias, selected_targets, output.scale, output.softcap, torch.is_grad_enabled()
        )
    return total, positions.sum()


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(logits, targets)) with logits = OutputLogits(scale, softcap) of F.linear(hidden, weight, bias),
    and its gradients taken in the same pass.

    Per chunk of LOSS_CHUNK rows: logits, log-normaliser, loss, then d loss / d logits = softmax − one-hot,
    times d logits / d z (scale·(1 − tanh²) under a softcap, scale without) for the output layer's result z,
    which is multiplied into the gradients of hidden (and of weight and bias when they train) at once.
    The chunk's logits are freed before the next one, and backward only scales the stored gradients:
    autograd's own backward would keep every chunk's logits until then, or recompute them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, softcap: float | None, with_grad: bool):
        grads = [with_grad and need for need in ctx.needs_input_grad[:3]]
        grad_hidden = torch.empty_like(hidden) if grads[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if grads[2] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            chunk, chunk_targets = hidden[rows], targets[rows]
            logits = F.linear(chunk, weight, bias).float()
            if scale != 1:
                logits.mul_(scale)
            if softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
            log_norm = logits.logsumexp(dim=-1)
            total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if not any(grads):
                continue
            # d logits / d z; under a softcap the one extra chunk-sized tensor, made before the softmax overwrites the logits
            slope = scale if softcap is None else logits.div(softcap).square_().neg_().add_(1).mul_(scale)
            d_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            d_logits[torch.arange(len(chunk_targets), device=d_logits.device), chunk_targets] -= 1
            if softcap is not None or scale != 1:
                d_logits.mul_(slope)
            if grad_hidden is not None:
                grad_hidden[rows] = d_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += d_logits.t() @ chunk.float()
            if grad_bias is not None:
                grad_bias += d_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


class SupervisedTrainer(Trainer):
    """HF Trainer whose loss applies the output layer only where a label is trained.

    Models on the proven list (SUPERVISED_LOSS_MODELS, transformers-native: their forward takes
    `logits_to_keep`) return the final hidden states and no logits; the output layer and what the
    model's forward does after it (OutputLogits) then run on the supervised positions only. Other
    models, and output layers that are not a plain nn.Linear (adapted, quantized or wrapped by
    modules_to_save), get their full logits reduced the same way.

    Batches come right-padded (PaddingCollator). A causal model's real tokens never attend to the
    padding after them, so models on the proven list get no padding mask: their attention takes its
    causal fast path, and the padding's own outputs are never trained (label -100).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated batch

    def __init__(self, *args, run_record: RunRecord | None = None, **kwargs):
        self.run_record = run_record  # written into every checkpoint, so each one describes itself
        super().__init__(*args, **kwargs)
        # Let the Trainer count supervised tokens over the accumulated batch (and across ranks).
        self.model_accepts_loss_kwargs = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        model_type = base.config.model_type
        # Remote code may carry a listed model_type, and may read the mask for more than attention.
        proven = model_type in SUPERVISED_LOSS_MODELS and "logits_to_keep" in inspect.signature(base.forward).parameters
        plain_head = type(base.get_output_embeddings()) is nn.Linear
        requested = getattr(self.args, "supervised_logits", True)
        self.head_on_selected = proven and plain_head and requested
        self.output_logits = SUPERVISED_LOSS_MODELS[model_type](base.config) if self.head_on_selected else None
        self.drop_padding_mask = proven
        if requested and not proven and self.is_world_process_zero():
            logger.warning(
                f"--supervised_logits: model_type {model_type!r} is not on the list of architectures whose "
                "supervised-position loss is proven equal to the model's own (SUPERVISED_LOSS_MODELS in "
                "fora/training.py); training computes full logits with the padding mask instead (exact, slower)"
            )
        # Tokens in the training batches this process built, and how many were real (not padding);
        # the real count stays a tensor on the device so counting never waits for the accelerator.
        self.batch_tokens, self.real_tokens = 0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        if model.training:
            self.batch_tokens += inputs["attention_mask"].numel()
            self.real_tokens = self.real_tokens + inputs["attention_mask"].sum()
        model_inputs = {"input_ids": inputs["input_ids"]}
        if not self.drop_padding_mask:
            model_inputs["attention_mask"] = inputs["attention_mask"]
        if self.head_on_selected:
            # No logits at all (an empty index, not 1: the last position is a strided slice, which the head
            # multiplies through a batched matmul over a copy of its weight per row: 0.8 s a step in bf16).
            no_logits = torch.empty(0, dtype=torch.long, device=labels.device)
            outputs = model(**model_inputs, logits_to_keep=no_logits, output_hidden_states=True, use_cache=False)
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            loss_sum, count = supervised_loss_sum(outputs.hidden_states[-1], labels, head, self.output_logits)
        else:
            outputs = model(**model_inputs, use_cache=False)
            loss_sum, count = supervised_loss_sum(outputs.logits, labels, None)
        if num_items_in_batch is None:  # evaluation: mean over this batch
            loss = loss_sum / count.clamp(min=1)
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # ranks' gradients are averaged; undo that for a token mean
        return (loss, outputs) if return_outputs else loss

    def trained_tokens(self) -> tuple[int, int]:
        """Real (not padding) and all tokens of this run's training batches, summed over the ranks.

        Counted here instead of by the Trainer's include_num_input_tokens_seen, which gathers and
        reads the count back to the host at every step.
        """
        device = self.args.device
        counts = torch.stack([torch.as_tensor(self.real_tokens, device=device), torch.tensor(self.batch_tokens, device=device)])
        real, total = self.accelerator.gather(counts).view(-1, 2).sum(0).tolist()
        return real, total

    # --- Global batches, the same under any number of processes ---------------------------------

    train_sampler: GlobalBatchSampler | None = None

    def _get_train_sampler(self, train_dataset=None):
        """GlobalBatchSampler for the random, sequential and length-grouped orders (batch_rebalance shards itself).

        transformers groups by length at the per-process batch size, draws the order from each process's
        global RNG (which dropout advances too), and completes a short last batch only under several
        processes: the records of a step changed with the number of processes.
        """
        strategy = self.args.train_sampling_strategy
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if strategy == "batch_rebalance" or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        lengths = None
        if strategy == "group_by_length":
            column = self.args.length_column_name
            lengths = dataset[column] if column in dataset.column_names else [len(ids) for ids in dataset["input_ids"]]
        self.train_sampler = GlobalBatchSampler(
            len(dataset),
            global_batch=self._train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed if self.args.data_seed is None else self.args.data_seed,
            shuffle=strategy != "sequential",
            lengths=lengths,
            drop_last=self.args.dataloader_drop_last,
        )
        return self.train_sampler

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # accelerate passes the epoch on to the sampler, except through the loader that skips a resumed
        # epoch's first batches under several processes; the sampler would then replay epoch 0's order.
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    # --- Atomic checkpoints ------------------------------------------------------------------------

    resumed_from: str | None = None  # the checkpoint this run started from; --save_total_limit keeps it
    staging_dir: str | None = None  # while set, the Trainer takes it for the run folder and writes the checkpoint in it

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
        self.resumed_from = resume_from_checkpoint or None
        if resume_from_checkpoint and not getattr(self.args, "trust_checkpoint", False):
            check_checkpoint_holds_only_data(resume_from_checkpoint)
        self.first_nonfinite_step = torch.tensor(NO_BAD_STEP, device=self.args.device)
        # Dropout draws from each process's own stream: with one seed everywhere, the processes would drop the
        # same units in the records they share a step with. (A resume restores each process's saved stream.)
        set_seed(self.args.seed + self.args.process_index)
        return super().train(resume_from_checkpoint, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return self.staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written whole into OUTPUT_DIR/.tmp-checkpoint-N/ and renamed to
        checkpoint-N once complete: a save that is killed or fails never leaves a checkpoint to resume from."""
        self.stop_if_training_diverged(check_weights=True)
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        staged = os.path.join(staging, name)
        self._clear_before_writing(staging)
        self.staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # its own pruning sees only the staging folder
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self.staging_dir = None
        if self.state.best_model_checkpoint == staged:  # the Trainer found this step best, in the staging folder
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank's part (its RNG state, DeepSpeed shards) is written
        if self.args.should_save:
            if self.run_record:
                self.run_record.save(staged)
            shutil.rmtree(final, ignore_errors=True)  # the same step, saved by an earlier run in this folder
            os.rename(staged, final)
            os.rmdir(staging)
            self._prune_checkpoints(run_dir, newest=final)
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self, run_dir: str, newest: str) -> None:
        """--save_total_limit: delete the oldest checkpoints, never the newest, the best, or the one resumed from."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        keep = {os.path.realpath(p) for p in (newest, self.state.best_model_checkpoint, self.resumed_from) if p}
        checkpoints = sort_checkpoints(run_dir)  # oldest step first
        excess = len(checkpoints) - limit
        for path in checkpoints:
            if excess > 0 and os.path.realpath(path) not in keep:
                shutil.rmtree(path)
                excess -= 1

    def _finalize_training(self, *args, **kwargs):
        # With --save_total_limit 1 and a best checkpoint, the Trainer deletes every other checkpoint when
        # training ends, the one resumed from too; _prune_checkpoints has already kept only what it must.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            return super()._finalize_training(*args, **kwargs)
        finally:
            self.args.save_total_limit = limit

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer.save_model, but the final model is written into OUTPUT_DIR/.tmp-model/ and its files are
        then renamed into OUTPUT_DIR: a save that fails midway leaves no half-written file, and an earlier
        model there as it was. (Checkpoints, `_internal_call`, are staged whole by _save_checkpoint.)"""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        self.stop_if_training_diverged(check_weights=True)
        output_dir = Path(output_dir or self.args.output_dir)
        staging = output_dir / f"{STAGING_PREFIX}model"
        self._clear_before_writing(staging)
        try:
            super().save_model(str(staging), _internal_call=True)  # no Hub push before the files are in place
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            for path in staging.iterdir():
                if (output_dir / path.name).is_dir():
                    shutil.rmtree(output_dir / path.name)
                os.replace(path, output_dir / path.name)
            staging.rmdir()
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _clear_before_writing(self, staging: str | Path) -> None:
        """Remove what a save killed midway left in `staging`, before any rank writes there."""
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    # --- Stopping when training diverges --------------------------------------------------------

    first_nonfinite_step = torch.tensor(NO_BAD_STEP)  # the first step whose loss was NaN/inf; per run, on the device

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Kept on the device: reading it costs a device-to-host sync, so it is read only where the
        # Trainer syncs anyway (when it logs the loss) and before anything is saved.
        step = self.state.global_step + 1
        self.first_nonfinite_step = torch.where(
            loss.isfinite(), self.first_nonfinite_step, self.first_nonfinite_step.clamp(max=step)
        )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs:  # a training log, or the run's summary
            self.stop_if_training_diverged()
        super().log(logs, start_time)

    def stop_if_training_diverged(self, check_weights: bool = False) -> None:
        """Raise at the first step whose loss was NaN/inf on any rank, before it is logged or saved.

        Before a save, `check_weights` also stops if the trained weights are NaN/inf: an update can
        make them so while its own loss was finite (NaN gradients), and the next loss would be too late.
        """
        bad_step = self.first_nonfinite_step.to(self.args.device)
        if check_weights:
            trained = [p.isfinite().all().to(bad_step.device) for p in self.model.parameters() if p.requires_grad]
            bad_step = torch.where(torch.stack(trained).all(), bad_step, bad_step.clamp(max=self.state.global_step))
        step = self.accelerator.gather(bad_step).min().item()
        if step != NO_BAD_STEP:
            kept = last_checkpoint(self.args.output_dir)
            raise UserError(
                f"step {step}: training diverged (NaN or infinite loss or weights); stopped without saving this "
                f"step or any later one ({f'last checkpoint: {kept}' if kept else 'no checkpoint was saved'}). "
                "Usual causes: too high a --learning_rate, or fp16 overflow"
            )


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint-N in `output_dir`: one with trainer_state.json, which the Trainer
    writes last (a checkpoint cut short before saves were atomic has none)."""
    if not Path(output_dir).is_dir():
        return None
    steps = {
        int(match[1]): path
        for path in Path(output_dir).iterdir()
        if (match := CHECKPOINT_NAME.fullmatch(path.name)) and (path / TRAINER_STATE_NAME).is_file()
    }
    return str(steps[max(steps)]) if steps else None


# --- Resuming loads data, never code -----------------------------------------------------------

PICKLED_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save's files; safetensors and JSON hold no code
DEEPSPEED_TAG_FILE = "latest"  # DeepSpeed's checkpoint names the folder of its states here


def check_checkpoint_holds_only_data(checkpoint: str | Path) -> None:
    """Refuse to resume from a checkpoint whose pickled files hold anything but tensors and plain data.

    Unpickling runs whatever code a file names. transformers and PEFT read their files with torch's
    weights-only unpickler, but DeepSpeed reads *_model_states.pt and *_optim_states.pt with
    weights_only=False. So every pickled file a resume may read is first opened here with the weights-only
    unpickler, allowing only the classes honest checkpoints hold, before any of them is loaded.
    """
    folder = Path(checkpoint)
    deepspeed = (folder / DEEPSPEED_TAG_FILE).is_file()
    if deepspeed:
        tag = (folder / DEEPSPEED_TAG_FILE).read_text(encoding="utf-8").strip()
        if tag in ("", ".", "..") or Path(tag).name != tag:  # DeepSpeed would read the folder it names, anywhere
            raise UserError(f"--resume_from_checkpoint {checkpoint}: {DEEPSPEED_TAG_FILE} names {tag!r}, not a folder of the checkpoint")
    with safe_globals(), torch.serialization.safe_globals(deepspeed_checkpoint_classes() if deepspeed else []):
        for path in pickled_files(folder):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except Exception as error:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
                detail = f"it unpickles {found[1]}" if found else str(error).strip().splitlines()[-1]
                raise UserError(
                    f"--resume_from_checkpoint {checkpoint}: {path.relative_to(folder)} is not only tensors and plain "
                    f"data ({detail}); loading it could run code, so this checkpoint is not resumed "
                    "(--trust_checkpoint resumes it anyway: only for a checkpoint you wrote yourself)"
                ) from None


def deepspeed_checkpoint_classes() -> list[type]:
    """The objects DeepSpeed's ZeRO optimizer states pickle besides tensors: its loss scaler, ZeRO stage and
    parameter-fragment addresses (plain attributes only; none defines its own unpickling)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def pickled_files(folder: Path) -> list[Path]:
    """The torch.save files under `folder`, through linked folders too (each real folder once), except the
    training arguments, which the Trainer writes for reference and a resume never reads."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            dirs.clear()
            continue
        seen.add(os.path.realpath(root))
        found += [Path(root, name) for name in files if name.endswith(PICKLED_SUFFIXES) and name != TRAINING_ARGS_NAME]
    return sorted(found)


class LossPlotCallback(TrainerCallback):
    """Writes OUTPUT_DIR/training_loss.png (train and eval loss per step) whenever the Trainer saves and at the end."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, Path(args.output_dir) / "training_loss.png")

    on_train_end = on_save


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), style, label=key.replace("_", " "))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_json(path: Path, values: dict) -> None:
    """Write through a temporary file, so `path` is either the old file or the whole new one."""
    staging = path.with_name(STAGING_PREFIX + path.name)
    staging.write_text(json.dumps(values, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(staging, path)
