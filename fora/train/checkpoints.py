"""Checkpoints that are safe to resume from: written whole under a staging name and renamed into place, the
newest complete one found by `last_checkpoint`, and refused on resume when a pickled file in it holds
anything but tensors and plain data (unpickling runs whatever code a file names)."""

import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from fora.errors import UserError
from fora.io import STAGING_PREFIX
from fora.tuners.attach import save_trained

CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


class StagedCheckpoints(Trainer):
    """Trainer saves (checkpoints and the final model) that are never seen half-written: each is written into a
    staging folder (STAGING_PREFIX) and renamed into place once complete, so a save that is killed or fails
    never leaves a checkpoint to resume from, nor a half-written model. --save_total_limit never deletes the
    newest checkpoint, the best one, or the one the run resumed from."""

    resumed_from: str | None = None  # the checkpoint this run started from; --save_total_limit keeps it
    staging_dir: str | None = None  # while set, the Trainer takes it for the run folder and writes the checkpoint in it
    run_record = None  # a fora.run.RunRecord, written into every checkpoint so each one describes itself
    initial_adapter: str | None = None  # PiSSA/OLoRA: what saves convert against (tuners.attach.save_trained)

    def refuse_to_save(self) -> None:
        """Called before anything of a save is written; raises to stop it (see SupervisedTrainer)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
        self.resumed_from = resume_from_checkpoint or None
        if resume_from_checkpoint and not getattr(self.args, "trust_checkpoint", False):
            check_checkpoint_holds_only_data(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return self.staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written whole into OUTPUT_DIR/.tmp-checkpoint-N/ and renamed to
        checkpoint-N once complete: a save that is killed or fails never leaves a checkpoint to resume from."""
        self.refuse_to_save()
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
            return self._write_model(output_dir)
        self.refuse_to_save()
        output_dir = Path(output_dir or self.args.output_dir)
        staging = output_dir / f"{STAGING_PREFIX}model"
        self._clear_before_writing(staging)
        try:
            self._write_model(str(staging))  # no Hub push before the files are in place
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

    def _write_model(self, output_dir: str) -> None:
        """The model's files (adapter or weights, tokenizer, training arguments) into `output_dir`, written by the
        saving rank. Under DeepSpeed ZeRO-1/2 every rank holds the whole model, and the Trainer's own path would
        first copy its whole state dict, frozen base included, into host memory on every rank (accelerate's
        get_state_dict); here the model writes itself, an adapter its trainable tensors only. ZeRO-3 shards the
        parameters: the Trainer gathers them."""
        if self.is_deepspeed_enabled and is_deepspeed_zero3_enabled():
            return super().save_model(output_dir, _internal_call=True)
        if self.args.should_save:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_trained(self.accelerator.unwrap_model(self.model), output_dir, self.initial_adapter)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _clear_before_writing(self, staging: str | Path) -> None:
        """Remove what a save killed midway left in `staging`, before any rank writes there."""
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()


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
