"""Global batches: the records of an optimizer step do not depend on how many processes share it."""

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices


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


class SamplerEpoch(TrainerCallback):
    """Gives the epoch to the trainer's GlobalBatchSampler when the epoch begins. accelerate passes it on too,
    except through the loader that skips a resumed epoch's first batches under several processes: the sampler
    would then replay epoch 0's order. `state.epoch` is the epoch index plus the fraction done (a resumed one
    starts part-way), so its whole part is the epoch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.train_sampler is not None:
            self.trainer.train_sampler.set_epoch(int(state.epoch))
