"""fora/train/sampler.py: global batches that do not depend on how processes and accumulation split them."""

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from fora.train.sampler import GlobalBatchSampler

LENGTHS = [(7 * i) % 23 + 1 for i in range(30)]  # 30 records: a short last global batch at 4 and 8


def steps(sampler, per_device, processes, accumulation):
    """The records of each optimizer step, as accelerate hands the sampler's batches to the processes."""
    shards = [
        list(BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=False), processes, rank))
        for rank in range(processes)
    ]
    assert len({len(batches) for batches in shards}) == 1, "every process runs the same number of micro-batches"
    micro_batches = len(shards[0])
    assert micro_batches % accumulation == 0, "no optimizer step is short of micro-batches"
    return [
        sorted(i for shard in shards for batch in shard[start : start + accumulation] for i in batch)
        for start in range(0, micro_batches, accumulation)
    ]


@pytest.mark.parametrize("global_batch", [4, 8])
@pytest.mark.parametrize("lengths", [LENGTHS, None], ids=["grouped", "random"])
def test_every_split_of_a_global_batch_trains_the_same_records_per_step(global_batch, lengths):
    def sampler():
        return GlobalBatchSampler(len(LENGTHS), global_batch, seed=5, shuffle=True, lengths=lengths, drop_last=False)

    one_process = steps(sampler(), global_batch, 1, 1)
    for per_device in (1, 2, global_batch // 2):
        for processes in (1, 2, global_batch // per_device):
            accumulation = global_batch // (per_device * processes)
            if accumulation:
                assert steps(sampler(), per_device, processes, accumulation) == one_process, (per_device, processes)
    records = [i for step in one_process for i in step]
    assert len(one_process) == -(-len(LENGTHS) // global_batch)
    assert set(records) == set(range(len(LENGTHS))), "every record is trained each epoch"
    assert len(records) - len(set(records)) < global_batch, "only the short last batch is completed, with repeats"


def test_length_grouping_is_kept_within_the_global_batch():
    order = list(GlobalBatchSampler(len(LENGTHS), 8, seed=5, shuffle=True, lengths=LENGTHS, drop_last=True))
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert len(order) == 24  # drop_last leaves the short batch out
    for batch in batches:  # longest first, but for the first record, which a swap may have brought in
        lengths = [LENGTHS[i] for i in batch]
        assert lengths[1:] == sorted(lengths[1:], reverse=True) or lengths == sorted(lengths, reverse=True)
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS), "the longest record comes first (memory fails early)"


def test_the_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = GlobalBatchSampler(len(LENGTHS), 4, seed=seed, shuffle=True, lengths=LENGTHS, drop_last=False)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(5, 0) == order(5, 0) and order(5, 1) == order(5, 1)
    assert order(5, 0) != order(5, 1) and order(5, 0) != order(6, 0)
    sequential = GlobalBatchSampler(6, 4, seed=5, shuffle=False, lengths=None, drop_last=False)
    assert list(sequential) == [0, 1, 2, 3, 4, 5, 0, 1]
    fewer_than_a_batch = GlobalBatchSampler(3, 8, seed=5, shuffle=False, lengths=None, drop_last=False)
    assert list(fewer_than_a_batch) == [0, 1, 2, 0, 1, 2, 0, 1]
