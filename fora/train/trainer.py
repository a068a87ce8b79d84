"""The Trainer subclass: HF's Trainer with the supervised-position loss (fora.train.loss), global batches
that do not depend on the number of processes (fora.train.sampler), staged checkpoints (fora.train.checkpoints),
a stop at the first step whose loss is NaN or infinite, and what some methods add to a step: LoRA+'s two
learning rates, AdaLoRA's rank allocation."""

import inspect
import logging

import torch
from torch import nn
from transformers import TrainerCallback, set_seed

from fora.errors import UserError
from fora.run import RunRecord
from fora.train.checkpoints import StagedCheckpoints, last_checkpoint
from fora.train.loss import SUPERVISED_LOSS_MODELS, DecoderOutput, supervised_loss_sum
from fora.train.sampler import GlobalBatchSampler, SamplerEpoch
from fora.tuners.methods import METHODS, LossPath

NO_BAD_STEP = torch.iinfo(torch.int64).max
logger = logging.getLogger(__name__)


class SupervisedTrainer(StagedCheckpoints):
    """HF Trainer whose loss applies the output layer only where a label is trained.

    Models on the proven list (SUPERVISED_LOSS_MODELS, transformers-native: their forward takes
    `logits_to_keep`) return the final hidden states and no logits; the output layer and what the
    model's forward does after it (OutputLogits) then run on the supervised positions only. Other
    models, output layers that are not a plain nn.Linear (adapted, quantized or wrapped by
    modules_to_save) and methods not proven for it (METHODS' `loss`: prefix and prompt tuning) get their
    full logits reduced the same way; AdaLoRA takes the model's own loss, to which it adds its regulariser.

    Batches come right-padded (PaddingCollator). A causal model's real tokens never attend to the
    padding after them, so models on the proven list get no padding mask: their attention takes its
    causal fast path, and the padding's own outputs are never trained (label -100).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated batch

    def __init__(self, *args, run_record: RunRecord | None = None, loraplus_lr_ratio: float | None = None,
                 initial_adapter: str | None = None, **kwargs):
        self.run_record = run_record
        self.method = run_record.finetuning_type if run_record else "lora"
        self.loraplus_lr_ratio, self.initial_adapter = loraplus_lr_ratio, initial_adapter
        super().__init__(*args, **kwargs)
        self.add_callback(SamplerEpoch(self))
        if self.method == "adalora":
            self.add_callback(AdaLoraBudget(self))
        # Let the Trainer count supervised tokens over the accumulated batch (and across ranks).
        self.model_accepts_loss_kwargs = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        model_type = base.config.model_type
        self.native = not base.is_custom_code()  # takes the Trainer's loss arguments (num_items_in_batch)
        proven = proven_supervised_loss(base)
        plain_head = type(base.get_output_embeddings()) is nn.Linear
        requested = getattr(self.args, "supervised_logits", True)
        method_loss = METHODS[self.method].loss
        self.loss_path = choose_loss_path(self.method, proven, plain_head, requested)
        self.head_on_selected = self.loss_path == "supervised"
        self.output_logits = SUPERVISED_LOSS_MODELS[model_type](base.config) if self.head_on_selected else None
        self.decoder_output = DecoderOutput(base.get_decoder()) if self.head_on_selected else None
        self.drop_padding_mask = proven and method_loss == "supervised"
        if requested and self.loss_path != "supervised" and self.is_world_process_zero():
            reason = (
                f"model_type {model_type!r} is not on the list of architectures whose supervised-position loss is "
                "proven equal to the model's own (SUPERVISED_LOSS_MODELS in fora/train/loss.py)"
                if method_loss == "supervised" else f"--finetuning_type {self.method}'s loss is not proven for it"
            )
            how = "PEFT's forward and the model's own loss" if self.loss_path == "model" else "full logits with the padding mask"
            logger.warning(f"--supervised_logits: {reason}; training computes {how} instead (exact, slower)")
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
        if self.loss_path == "model":
            return self.model_loss(model, model_inputs, labels, return_outputs, num_items_in_batch)
        if self.head_on_selected:
            # No logits at all (an empty index, not 1: the last position is a strided slice, which the head
            # multiplies through a batched matmul over a copy of its weight per row, a slow path in bf16).
            no_logits = torch.empty(0, dtype=torch.long, device=labels.device)
            outputs = model(**model_inputs, logits_to_keep=no_logits, use_cache=False)
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            loss_sum, count = supervised_loss_sum(self.decoder_output.take(), labels, head, self.output_logits)
        else:
            outputs = model(**model_inputs, use_cache=False)
            # Prompt tuning puts its virtual tokens' logits first: the input's own are the last ones.
            loss_sum, count = supervised_loss_sum(outputs.logits[:, -labels.shape[1]:], labels, None)
        if num_items_in_batch is None:  # evaluation: mean over this batch
            loss = loss_sum / count.clamp(min=1)
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # ranks' gradients are averaged; undo that for a token mean
        return (loss, outputs) if return_outputs else loss

    def model_loss(self, model, model_inputs, labels, return_outputs, num_items_in_batch):
        """The model's own loss from `labels` (AdaLoRA's, with its regulariser), over the accumulated batch: a native
        model divides by `num_items_in_batch`; remote code takes its mean, averaged over the accumulation steps."""
        given = {"num_items_in_batch": num_items_in_batch} if self.native and num_items_in_batch is not None else {}
        outputs = model(**model_inputs, labels=labels, use_cache=False, **given)
        loss = outputs.loss
        if given and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size
        elif num_items_in_batch is not None and not given:
            loss = loss / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        """LoRA+ (--loraplus_lr_ratio): PEFT's optimizer with B's learning rate that many times A's."""
        if self.optimizer is None and self.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = create_loraplus_optimizer(
                self.model, optimizer_cls, lr=self.args.learning_rate, loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_weight_decay=self.args.weight_decay, **kwargs,
            )
        return super().create_optimizer(model)

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

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        self.first_nonfinite_step = torch.tensor(NO_BAD_STEP, device=self.args.device)
        # Dropout draws from each process's own stream: with one seed everywhere, the processes would drop the
        # same units in the records they share a step with. (A resume restores each process's saved stream.)
        set_seed(self.args.seed + self.args.process_index)
        return super().train(resume_from_checkpoint, **kwargs)

    def refuse_to_save(self) -> None:
        self.stop_if_training_diverged(check_weights=True)

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


def proven_supervised_loss(base) -> bool:
    """The model's supervised-position loss is proven equal to its own (SUPERVISED_LOSS_MODELS) and its forward takes
    `logits_to_keep`; remote code may carry a listed model_type, and may read the mask for more than attention."""
    return base.config.model_type in SUPERVISED_LOSS_MODELS and "logits_to_keep" in inspect.signature(base.forward).parameters


def choose_loss_path(method: str, proven: bool, plain_head: bool, requested: bool) -> LossPath:
    """How the loss is computed (see METHODS' `loss`): the supervised-position path where the architecture is proven,
    its output layer a plain nn.Linear and --supervised_logits asks for it; the method's own path otherwise."""
    method_loss = METHODS[method].loss
    return method_loss if method_loss != "supervised" else "supervised" if proven and plain_head and requested else "logits"


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA's rank allocation after every optimizer step, while the gradients it scores are still there
    (PEFT's update_and_allocate, called where its documentation places it)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        model.base_model.update_and_allocate(state.global_step)
