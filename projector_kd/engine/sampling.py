"""Samplers both tracks train and evaluate with: exact mid-epoch resume without reading skipped batches, and
evaluation shards that count every image once; :func:`rebuild_loader` is how a ``DataLoader`` is rebuilt around them
(or with other settings).

Exact resume: the training sampler yields ``(epoch, index)`` pairs in an order that is a pure function of
``(seed, epoch, rank, world_size)``, and :class:`SeededSamples` reseeds python/numpy/torch for every sample from
``(seed, epoch, index)``. So a run resumed at batch k of an epoch sees exactly the batches an uninterrupted run sees,
whatever the number of loader workers, and the k batches already trained are never read again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from projector_kd.engine.errors import UserError


def _derived_seed(*entropy: int) -> int:
    """A 63-bit seed that is a pure function of ``entropy`` (numpy's ``SeedSequence`` mixing)."""
    words = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch): for draws made once per epoch."""
    return _derived_seed(seed, epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, sample index)."""
    return _derived_seed(seed, epoch, index)


BATCH_STREAM = 0xBA7C4  # keeps batch seeds apart from the sample seeds of the same numbers


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, batch number, rank): for draws made once per batch on
    one process (e.g. random erasing on the device), different on each rank."""
    return _derived_seed(seed, epoch, batch, rank, BATCH_STREAM)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is drawn with python/numpy/torch seeded from
    ``(seed, epoch, index)``; the caller's generator states are restored afterwards. A plain int index is passed
    through unseeded (evaluation)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        epoch, index = key
        value = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(value)
                np.random.seed(value % 2**32)
                torch.manual_seed(value)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler):
    """Shuffled, rank-sharded training order that can start mid-epoch.

    Epoch order: ``torch.randperm(n)`` from a generator seeded with ``seed + epoch`` (``0..n-1`` when not
    ``shuffle``), padded by wrap-around to a multiple of ``world_size`` — or, with ``drop_last``, cut to one — then
    every ``world_size``-th index from ``rank`` (as ``DistributedSampler``). Yields ``(epoch, index)`` pairs;
    :meth:`set_epoch` with ``start_batch = k`` skips the first ``k * batch_size`` of them.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.num_items = num_items
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.per_rank = num_items // world_size if drop_last else math.ceil(num_items / world_size)
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank per epoch (the last partial batch is dropped)."""
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, from the start of the epoch."""
        order = list(range(self.num_items))
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        total = self.per_rank * self.world_size
        if total > self.num_items:
            order += (order * math.ceil(total / self.num_items))[: total - self.num_items]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size


LOADER_SETTINGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def rebuild_loader(loader: DataLoader, **overrides: Any) -> DataLoader:
    """A new ``DataLoader`` over ``loader``'s dataset, batching and settings (:data:`LOADER_SETTINGS`, those this
    PyTorch has), with ``overrides`` (``DataLoader`` arguments by name) in their place. Batching: ``loader``'s own
    batch sampler (or sampler, without automatic batching), unless ``overrides`` give a ``batch_sampler``, or a
    ``sampler`` (then batched by ``loader``'s ``batch_size`` and ``drop_last`` unless overridden too). Without
    workers, the worker-only settings (``prefetch_factor``, ``persistent_workers``, ``multiprocessing_context``,
    ``timeout``) do not apply and are left out."""
    if "batch_sampler" in overrides:
        batching = {}
    elif "sampler" in overrides:
        batching = {"batch_size": loader.batch_size, "drop_last": loader.drop_last}
    elif loader.batch_sampler is not None:
        batching = {"batch_sampler": loader.batch_sampler}
    else:
        batching = {"sampler": loader.sampler, "batch_size": None}
    settings = {name: getattr(loader, name) for name in LOADER_SETTINGS if hasattr(loader, name)}
    arguments = {"dataset": loader.dataset, **batching, **settings, **overrides}
    if not arguments["num_workers"]:
        arguments.update(prefetch_factor=None, persistent_workers=False, multiprocessing_context=None, timeout=0)
    return DataLoader(**arguments)


def resumable_loader(loader: DataLoader, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """``loader`` (dataset, batch size, workers, collate function, pinning) rebuilt over a :class:`ResumableSampler`
    and :class:`SeededSamples`, its own draws from a private generator seeded with ``seed``, so a run resumes
    mid-epoch exactly without reading the batches already trained. The sampler keeps ``loader``'s choices: shuffled
    unless it reads in order, and both ``drop_last`` settings — the batch sampler's (drop the last partial batch) and
    a ``DistributedSampler``'s (drop the tail that does not divide evenly over the ranks instead of padding it). A
    loader whose batches are not plain ``batch_size`` slices of one sampler is refused."""
    batch_sampler = loader.batch_sampler
    if type(batch_sampler) is not BatchSampler:
        raise UserError(
            f"the training loader groups images with {type(batch_sampler).__name__}; exact resume needs plain "
            f"batches (batch_size and drop_last in the loader's kwargs, no batch_sampler)"
        )
    sampler = batch_sampler.sampler
    shuffle = getattr(sampler, "shuffle", not isinstance(sampler, SequentialSampler))
    drop_tail = isinstance(sampler, DistributedSampler) and sampler.drop_last
    generator = torch.Generator()
    generator.manual_seed(seed)
    return rebuild_loader(
        loader,
        dataset=SeededSamples(loader.dataset, seed),
        sampler=ResumableSampler(
            len(loader.dataset), batch_sampler.batch_size, seed, rank, world_size, shuffle, drop_last=drop_tail
        ),
        batch_size=batch_sampler.batch_size,
        drop_last=batch_sampler.drop_last,
        generator=generator,
    )


def training_sampler(loader: Any) -> ResumableSampler:
    """The :class:`ResumableSampler` a training loader (a ``DataLoader`` or a loader with its ``batch_sampler``)
    draws from."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, ResumableSampler):
        raise TypeError(f"the training loader samples with {type(sampler).__name__}, not a ResumableSampler")
    return sampler


class ShardSampler(Sampler[int]):
    """Evaluation order: indices ``rank, rank + world_size, ...`` with no padding, so over all ranks every image is
    seen exactly once (a ``DistributedSampler`` pads the last shard with repeated images, which would bias summed
    accuracies)."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, num_items, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def unpadded_eval_loader(loader: Any) -> Any:
    """``loader`` itself, or — when it shards with a ``DistributedSampler`` — the same loader over a
    :class:`ShardSampler`, so accuracies summed over ranks count each image once."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", getattr(loader, "sampler", None))
    if not isinstance(sampler, DistributedSampler):
        return loader
    batch_size = getattr(batch_sampler, "batch_size", None) or loader.batch_size
    return rebuild_loader(
        loader,
        sampler=ShardSampler(len(loader.dataset), sampler.rank, sampler.num_replicas),
        batch_size=batch_size,
        drop_last=False,
    )
