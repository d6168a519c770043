"""The shared samplers: resumable training order, per-sample seeding, unpadded evaluation shards."""

import inspect
import random

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler, TensorDataset

from projector_kd.engine.errors import UserError
from projector_kd.engine.sampling import (
    LOADER_SETTINGS,
    ResumableSampler,
    SeededSamples,
    ShardSampler,
    rebuild_loader,
    resumable_loader,
    sample_seed,
    training_sampler,
    unpadded_eval_loader,
)


class RandomDraws(Dataset):
    """Item i: (i, one draw from each of python, numpy and torch)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        return index, random.random(), float(np.random.rand()), torch.rand(()).item()


def test_epoch_order_is_a_pure_function_of_seed_epoch_rank_and_world_size():
    shards = [list(ResumableSampler(10, 2, seed=3, rank=rank, world_size=4)) for rank in range(4)]
    indices = [index for shard in shards for _, index in shard]
    assert all(len(shard) == 3 for shard in shards)  # ceil(10 / 4), padded by wrap-around
    assert sorted(set(indices)) == list(range(10)) and len(indices) == 12
    again = ResumableSampler(10, 2, seed=3, rank=1, world_size=4)
    assert list(again) == shards[1]
    again.set_epoch(1)
    assert all(epoch == 1 for epoch, _ in again)
    assert [index for _, index in again] == again.epoch_indices(1) != again.epoch_indices(0)


def test_resume_at_batch_k_yields_the_rest_of_the_epoch():
    whole = ResumableSampler(13, batch_size=3, seed=0)
    whole.set_epoch(5)
    resumed = ResumableSampler(13, batch_size=3, seed=0)
    resumed.set_epoch(5, start_batch=2)
    assert list(resumed) == list(whole)[6:]
    assert len(resumed) == 13 - 6
    assert whole.batches_per_epoch == 4


def test_seeded_samples_repeat_their_draws_and_leave_the_global_generators_alone():
    data = SeededSamples(RandomDraws(), seed=7)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    first = data[(2, 4)]
    after = (random.random(), float(np.random.rand()), torch.rand(()).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == after
    assert data[(2, 4)] == first and first[0] == 4
    assert data[(3, 4)] != first
    assert sample_seed(7, 2, 4) == sample_seed(7, 2, 4) != sample_seed(7, 2, 5)
    assert data[4][0] == 4  # a plain index passes through


def test_shard_sampler_counts_every_image_once():
    shards = [list(ShardSampler(10, rank, 4)) for rank in range(4)]
    assert shards == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


def test_unpadded_eval_loader_replaces_a_distributed_sampler():
    data = list(range(10))
    plain = DataLoader(data, batch_size=4)
    assert unpadded_eval_loader(plain) is plain
    padded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=4, rank=3, shuffle=False))
    assert sum(len(b) for b in padded) == 3  # the last shard repeats an image
    assert [x.tolist() for x in unpadded_eval_loader(padded)] == [[3, 7]]


def test_resumable_loader_keeps_the_loader_and_starts_mid_epoch():
    data = TensorDataset(torch.arange(10))
    loader = resumable_loader(DataLoader(data, batch_size=3, shuffle=True, drop_last=True), seed=4)
    sampler = training_sampler(loader)
    assert (sampler.shuffle, sampler.seed, loader.batch_size, loader.drop_last) == (True, 4, 3, True)
    sampler.set_epoch(2)
    whole = [batch[0].tolist() for batch in loader]
    assert sum(whole, []) == sampler.epoch_indices(2)[:9] != list(range(9))
    sampler.set_epoch(2, start_batch=1)
    assert [batch[0].tolist() for batch in loader] == whole[1:] and len(loader) == 2
    in_order = resumable_loader(DataLoader(data, batch_size=5), seed=0, rank=1, world_size=2)
    assert [batch[0].tolist() for batch in in_order] == [[1, 3, 5, 7, 9]]


def test_resumable_loader_refuses_grouped_batches():
    batches = BatchSampler(SequentialSampler(range(4)), 2, False)

    class Grouped(BatchSampler):
        pass

    with pytest.raises(UserError, match="exact resume needs plain batches"):
        resumable_loader(DataLoader(range(4), batch_sampler=Grouped(batches.sampler, 2, False)), seed=0)
    with pytest.raises(TypeError, match="not a ResumableSampler"):
        training_sampler(DataLoader(range(4), batch_sampler=batches))


def test_drop_last_sampler_cuts_the_tail_instead_of_padding():
    shards = [ResumableSampler(10, 2, seed=3, rank=rank, world_size=4, drop_last=True) for rank in range(4)]
    indices = [index for shard in shards for _, index in shard]
    assert [len(shard) for shard in shards] == [2, 2, 2, 2]  # floor(10 / 4): no image repeated
    assert len(set(indices)) == 8 and set(indices) < set(range(10))
    assert indices == [i for shard in shards for i in shard.epoch_indices(0)]
    padded = ResumableSampler(10, 2, seed=3, rank=1, world_size=4)
    assert shards[1].epoch_indices(0) == padded.epoch_indices(0)[:2]  # same order, the tail cut
    shards[1].set_epoch(0, start_batch=1)
    assert list(shards[1]) == [] and len(shards[1]) == 0


@pytest.mark.parametrize("drop_last", [True, False])
def test_resumable_loader_keeps_the_batch_samplers_drop_last(drop_last):
    data = TensorDataset(torch.arange(10))
    batches = BatchSampler(SequentialSampler(data), 4, drop_last)
    loader = resumable_loader(DataLoader(data, batch_sampler=batches), seed=0)
    assert [len(batch[0]) for batch in loader] == ([4, 4] if drop_last else [4, 4, 2])
    assert [batch[0].tolist() for batch in loader][-1] == ([4, 5, 6, 7] if drop_last else [8, 9])
    training_sampler(loader).set_epoch(0, start_batch=2)
    assert [batch[0].tolist() for batch in loader] == ([] if drop_last else [[8, 9]])


@pytest.mark.parametrize("drop_last", [True, False])
def test_resumable_loader_keeps_a_distributed_samplers_drop_last_and_shuffle(drop_last):
    data = TensorDataset(torch.arange(10))
    shards = []
    for rank in range(4):
        sampler = DistributedSampler(data, num_replicas=4, rank=rank, shuffle=False, drop_last=drop_last)
        loader = resumable_loader(DataLoader(data, sampler=sampler, batch_size=3), seed=0, rank=rank, world_size=4)
        shards.append([index for batch in loader for index in batch[0].tolist()])
    if drop_last:  # every image at most once
        assert shards == [[0, 4], [1, 5], [2, 6], [3, 7]]
    else:  # padded by wrap-around, as DistributedSampler
        assert shards == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]


def _init_worker(worker_id: int) -> None:
    torch.manual_seed(worker_id)


def test_rebuild_loader_keeps_every_setting_but_the_overrides():
    data = TensorDataset(torch.arange(10))
    generator = torch.Generator().manual_seed(3)
    batches = BatchSampler(SequentialSampler(data), 4, False)
    loader = DataLoader(
        data,
        batch_sampler=batches,
        num_workers=2,
        collate_fn=list,
        pin_memory=True,
        timeout=5.0,
        worker_init_fn=_init_worker,
        multiprocessing_context="spawn",
        generator=generator,
        prefetch_factor=3,
        persistent_workers=True,
        in_order=False,
    )
    same = rebuild_loader(loader)
    assert same is not loader and same.dataset is data and same.batch_sampler is batches
    batching = {"self", "dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"}
    assert set(LOADER_SETTINGS) == set(inspect.signature(DataLoader.__init__).parameters) - batching
    assert {name: getattr(same, name) for name in LOADER_SETTINGS} == {
        name: getattr(loader, name) for name in LOADER_SETTINGS
    }
    assert (same.num_workers, same.collate_fn, same.pin_memory, same.timeout, same.worker_init_fn) == (
        2,
        list,
        True,
        5.0,
        _init_worker,
    )
    assert (same.generator, same.prefetch_factor, same.persistent_workers, same.in_order) == (generator, 3, True, False)
    assert same.multiprocessing_context is loader.multiprocessing_context is not None
    changed = rebuild_loader(loader, pin_memory=False, num_workers=0, collate_fn=None)
    no_workers = (changed.prefetch_factor, changed.persistent_workers, changed.multiprocessing_context, changed.timeout)
    assert (changed.pin_memory, changed.num_workers, no_workers) == (False, 0, (None, False, None, 0))
    assert changed.batch_sampler is batches and [b[0].tolist() for b in changed] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_rebuild_loader_batches_a_new_sampler_like_the_loader():
    data = TensorDataset(torch.arange(10))
    loader = DataLoader(data, batch_size=4, drop_last=True, collate_fn=lambda items: [i[0].item() for i in items])
    reversed_order = rebuild_loader(loader, sampler=range(9, -1, -1))
    assert list(reversed_order) == [[9, 8, 7, 6], [5, 4, 3, 2]]
    assert list(rebuild_loader(loader, sampler=range(10), batch_size=3, drop_last=False)) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9],
    ]
    unbatched = DataLoader(data, batch_size=None)
    assert [x[0].item() for x in rebuild_loader(unbatched)] == list(range(10))
    regrouped = rebuild_loader(loader, batch_sampler=[[0, 9], [5]])
    assert list(regrouped) == [[0, 9], [5]]
