"""Training loaders that resume exactly: shuffle order, position and augmentation are in the checkpoint.

The order of an epoch and the augmentation of a sample are functions of ``(seed, epoch, sample
index)`` only: :class:`ResumableSampler` draws the epoch's permutation from ``seed + epoch`` (as
``DistributedSampler`` does, this rank's share under DDP) and yields ``(epoch, index)`` keys, and
datasets seed the augmentation of a sample with :func:`sample_seed`. :class:`ResumableLoader`
counts the batches it has served in the epoch; Lightning stores its ``state_dict`` in every
checkpoint and loads it before iterating again, so a run resumed from a mid-epoch checkpoint
serves exactly the batches the interrupted run would have served next, with any ``num_workers``
(which worker draws a sample does not change its augmentation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SampleKey = tuple[int, int]  # (epoch, index) as yielded by ResumableSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for the augmentation of sample ``index`` in ``epoch``, independent across the three."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def split_key(key: int | SampleKey) -> tuple[int | None, int]:
    """``(epoch, index)`` of a dataset key: a :class:`ResumableSampler` key, or a plain index (epoch None)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (None, int(key))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled, permutation seeded by ``seed + epoch``) that yields
    ``(epoch, index)`` keys and can start an epoch at sample ``start`` (one resume, then 0 again).

    It stays a ``DistributedSampler``, so Lightning uses it as it is under DDP instead of wrapping it.
    """

    def __init__(
        self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def __iter__(self) -> Iterator[SampleKey]:
        start, self.start = self.start, 0
        epoch = self.epoch
        for index in itertools.islice(super().__iter__(), start, None):
            yield epoch, int(index)


class ResumableLoader(DataLoader):
    """Training ``DataLoader`` over a :class:`ResumableSampler`; ``state_dict()`` = the epoch and the
    batches served in it, which Lightning saves in checkpoints and restores on resume.

    Iteration starts at the first ``next()`` (after Lightning's ``set_epoch``): a restored position
    applies when the epoch being served is the saved one (resumed mid-epoch), and is dropped when
    it is a later one (the checkpoint was written at the end of its epoch).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._served = 0
        self._restored: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        restored, self._restored = self._restored, None
        resume = restored is not None and restored["epoch"] == self.sampler.epoch
        self._served = restored["batches"] if resume else 0
        self.sampler.start = self._served * self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        self.sampler.set_epoch(self._restored["epoch"])


class ResumableTraining:
    """DataModule mixin: :meth:`resumable_loader` builds the training loader, and the DataModule's
    ``state_dict`` (which Lightning checkpoints) holds that loader's position.

    The loader is also stateful itself, but Lightning restores loader states only when it builds
    the loader after reading the checkpoint, which it does not when the module asks for
    ``trainer.estimated_stepping_batches`` (LR schedules); the DataModule's state is always restored.
    """

    _train_loader: ResumableLoader | None = None
    _train_loader_state: dict[str, int] | None = None

    def resumable_loader(self, dataset: Dataset, seed: int, batch_size: int, **options: Any) -> ResumableLoader:
        """A :class:`ResumableLoader` over this rank's share of ``dataset`` (a restored position applied)."""
        trainer = getattr(self, "trainer", None)
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loader = ResumableLoader(dataset, ResumableSampler(dataset, seed, world_size, rank), batch_size, **options)
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if state is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_loader_state = state
