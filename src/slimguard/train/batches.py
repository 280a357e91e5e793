"""Where a training epoch's batches come from: an in-memory split, or a user's DataLoader streamed.

:func:`slimguard.train.finetune` asks a :class:`Batches` source for each epoch's ``(inputs, labels, count)``
batches and never looks at the data any other way:

* :class:`SplitBatches` serves a :class:`~slimguard.data.core.Split` held in memory (``sg.data.load``,
  ``npz:`` files): every epoch a seeded permutation of its examples, cut into batches; under ``torchrun``
  each rank takes its share of the permutation (:func:`~slimguard.train.distributed.shard_indices`).
* :class:`StreamBatches` serves a torch ``DataLoader`` or any re-iterable of ``(inputs, labels)`` batches.
  It iterates the loader afresh every epoch and hands each batch on as it arrives, so a data set that does
  not fit in memory trains as well as one that does: the loop holds one batch at a time (a DataLoader's
  workers may prefetch a few). A one-shot iterator (a generator) cannot be read twice and so serves one
  epoch only.

Under ``torchrun`` a streamed loader is sharded one of two ways:

* it has a ``DistributedSampler`` (the usual PyTorch way): each rank reads only its own examples and
  trains on every batch; the sampler's ``set_epoch`` is called each epoch so the shuffle changes;
* it has none: every rank reads the whole loader and trains on every ``world_size``-th batch (rank ``r``
  takes batches ``r``, ``r + N``, ...). A last round with fewer than ``N`` batches is dropped, so that all
  ranks take the same number of steps. The loader must then yield the same batches in the same order on
  every rank (no shuffle, or a shuffle with a seeded ``generator``).

Example:
    >>> source = StreamBatches(DataLoader(dataset, batch_size=64, shuffle=True), "train")
    >>> for epoch in range(3):
    ...     for inputs, labels, count in source.epoch(epoch):
    ...         ...
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import DataError
from slimguard.core.torch_utils import device_of, eval_mode, forward, to_device
from slimguard.data.core import Split

Batch = tuple[Any, Any, int]
"""``(inputs, labels or None, number of examples)``."""


class Batches(abc.ABC):
    """One epoch's batches for this rank, as many epochs as asked for."""

    @abc.abstractmethod
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of epoch ``epoch`` (0-based), produced lazily."""

    @abc.abstractmethod
    def steps_per_epoch(self) -> int | None:
        """Batches this rank takes per epoch, or None when the source has no length."""


def _take(x: Any, idx: torch.Tensor) -> Any:
    if torch.is_tensor(x):
        return x[idx]
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return [x[i] for i in idx.tolist()]


class SplitBatches(Batches):
    """Batches of an in-memory split: each epoch a fresh permutation from one generator seeded with ``seed``.

    Args:
        split: the examples (tensor inputs, a dict of tensors, or a list of texts; labels optional).
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        seed: seed of the permutations; the same seed gives the same batches in the same order.
    """

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        from slimguard.train import distributed

        self.split, self.batch_size = split, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.sharded = distributed.is_initialized()

    def steps_per_epoch(self) -> int:
        from slimguard.train import distributed

        per_rank = math.ceil(len(self.split) / distributed.world_size())
        return max(1, math.ceil(per_rank / self.batch_size))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        perm = torch.randperm(len(self.split), generator=self.generator)
        if self.sharded:  # this rank's shard, padded so that every rank takes the same number of steps
            from slimguard.train.distributed import shard_indices

            perm = shard_indices(perm)
        x, y = self.split.x, self.split.y
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i : i + self.batch_size]
            yield _take(x, idx), None if y is None else y[idx], len(idx)


def _distributed_sampler(loader: Any) -> Any:
    """The loader's ``DistributedSampler`` (as its sampler or inside its batch sampler), or None."""
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def is_one_shot(data: Any) -> bool:
    """True for an iterator (a generator, ``iter(loader)``): it yields its batches once, then nothing."""
    return isinstance(data, Iterator)


def unpack(batch: Any, what: str) -> Batch:
    """``(inputs, labels, count)`` of one streamed batch: ``(inputs, labels, ...)`` as a ``TensorDataset``'s
    DataLoader yields it; labels that are not a tensor (a list of class ids) become one."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError(f"{what}: batches must be (inputs, labels) pairs, got {type(batch).__name__}; yield "
                        "(inputs, labels) from the DataLoader (a TensorDataset does)")
    x, y = batch[0], batch[1]
    if y is not None and not torch.is_tensor(y):
        y = torch.as_tensor(y)
    count = len(y) if y is not None else len(x)
    return x, y, count


class StreamBatches(Batches):
    """A user's DataLoader or iterable of ``(inputs, labels)`` batches, read afresh every epoch.

    Args:
        data: a torch ``DataLoader``, a list of batches, or any object whose ``iter()`` starts over; an
            iterator (a generator) is accepted for one pass only (:meth:`epoch` refuses a second).
        what: the name used in error messages (``train``, ``val``).

    Raises:
        DataError: the loader's ``DistributedSampler`` was built for another number of ranks than this run has.
    """

    def __init__(self, data: Any, what: str) -> None:
        from slimguard.train import distributed

        self.data, self.what = data, what
        self.one_shot = is_one_shot(data)
        self.sampler = _distributed_sampler(data)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.passes = 0
        replicas = getattr(self.sampler, "num_replicas", self.world)
        if self.sampler is not None and replicas != self.world:
            raise DataError(f"{what}: the DataLoader's DistributedSampler has num_replicas={replicas} but this run "
                            f"has {self.world} rank(s); build the sampler inside the run (DistributedSampler(dataset) "
                            "reads the process group)")

    @property
    def sharded_by_sampler(self) -> bool:
        """True when the loader's own ``DistributedSampler`` gives each rank its share."""
        return self.sampler is not None

    def steps_per_epoch(self) -> int | None:
        try:
            n = len(self.data)
        except TypeError:  # an iterable dataset without __len__, a generator
            return None
        return n if self.sharded_by_sampler or self.world == 1 else n // self.world

    def count_steps(self) -> int:
        """Batches this rank takes per epoch, found by reading the data once (for a source without a length).

        Raises:
            DataError: the source is a one-shot iterator, which counting would use up.
        """
        if self.one_shot:
            raise DataError(f"{self.what}: a one-shot iterator (generator) has no length, and counting its batches "
                            "would use it up; set max_steps, or pass a DataLoader or a list of batches")
        n = sum(1 for _ in self._read())
        return n if self.sharded_by_sampler or self.world == 1 else n // self.world

    def _read(self) -> Iterator[Any]:
        if self.one_shot and self.passes:
            raise DataError(f"{self.what}: a one-shot iterator (generator) was read once already and is empty now; "
                            "pass a re-iterable (a DataLoader or a list of batches), or train one epoch")
        self.passes += 1
        return iter(self.data)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        batches = self._read()
        if self.sharded_by_sampler or self.world == 1:
            for batch in batches:
                yield unpack(batch, self.what)
            return
        mine = None
        for i, batch in enumerate(batches):  # every world-th batch; an incomplete last round is dropped
            if i % self.world == self.rank:
                mine = batch
            if i % self.world == self.world - 1:
                yield unpack(mine, self.what)
                mine = None


@torch.no_grad()
def stream_score(model: nn.Module, source: StreamBatches, loss_fn: Callable[..., torch.Tensor]) -> float:
    """Validation score of ``model`` on a streamed split, higher is better: top-1 accuracy when the labels are
    class indices (an integer tensor), else minus the mean of ``loss_fn(model, inputs, labels)`` per example.

    Runs in eval mode (modes restored) on the model's device. Under ``torchrun`` with a ``DistributedSampler``
    the ranks' sums are added up, so every rank scores the whole split; otherwise each rank reads all of it.

    Raises:
        DataError: the split yields no batches.
    """
    device = device_of(model)
    total, correct, loss_sum = 0, 0, 0.0
    classify: bool | None = None  # decided by the first batch's labels
    with eval_mode(model):
        for x, y, k in source.epoch(0):
            x = to_device(x, device)
            yd = None if y is None else to_device(y, device)
            if classify is None:
                classify = y is not None and not y.is_floating_point() and not y.is_complex()
            if classify:
                correct += int((forward(model, x).argmax(-1) == yd).sum())
            else:
                loss_sum += float(loss_fn(model, x, yd)) * k
            total += k
    sums = torch.tensor([total, correct, loss_sum, float(bool(classify))], dtype=torch.float64)
    if source.sharded_by_sampler:
        from slimguard.train.distributed import all_reduce_

        all_reduce_(sums, "sum")
        sums[3] = float(sums[3] == source.world)  # accuracy only when every rank had class labels
    if sums[0] == 0:
        raise DataError(f"{source.what}: the batches are empty; give at least one (inputs, labels) batch")
    if bool(sums[3]):
        return float(sums[1] / sums[0])
    return -float(sums[2] / sums[0])
