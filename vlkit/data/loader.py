"""Deterministic streams of batches.

Training reads samples by a global position: sample ``i`` of the stream is fixed by the data
seed (the synthetic world draws it; a finite dataset takes it from a seeded permutation of its
epoch). So the data position saved in a checkpoint is one integer, a resumed run sees exactly
the batches an uninterrupted one would, and augmentation is reproducible (its RNG is seeded by
the sample position).
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - its exit handler is registered before ours
import random
import signal
import weakref
from typing import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class SyntheticSource:
    """Sample ``i`` of the synthetic world's stream for a split. ``single_object``: True or
    False, or a share in (0, 1): each sample is then a single-object one with that probability
    (drawn from its position, so the stream stays fixed). ``image_only``: records without their
    text (image, objects, label: what a classifier reads), the same images as the full stream;
    ``questions=False``: records without their ``qa`` (a model that trains no VQA)."""

    def __init__(self, world, split: str = "train", single_object: bool | float = False, offset: int = 0,
                 image_only: bool = False, questions: bool = True):
        if not isinstance(single_object, bool) and not 0 < single_object < 1:
            raise ValueError(f"single_object: True, False or a share in (0, 1), got {single_object}")
        self.world, self.split, self.single_object = world, split, single_object
        self.offset = offset  # a different training seed reads another stretch of the stream
        self.image_only, self.questions = bool(image_only), bool(questions)

    def __call__(self, i: int) -> dict:
        single = self.single_object
        if not isinstance(single, bool):
            single = random.Random(f"single-object {self.offset + i}").random() < single
        return self.world.sample(self.offset + i, split=self.split, single_object=single,
                                 image_only=self.image_only, questions=self.questions)


class EpochSource:
    """Sample ``i`` of an endless stream over a finite dataset: epoch ``i // N`` in a seeded
    permutation of its own."""

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self._epoch, self._perm = -1, None

    @property
    def bad_samples(self) -> dict[int, str] | None:
        """The dataset's record of samples skipped as bad (index -> reason), if it keeps one."""
        return getattr(self.dataset, "bad_samples", None)

    def __call__(self, i: int) -> dict:
        n = len(self.dataset)
        epoch, offset = divmod(i, n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
            self._epoch = epoch
        return self.dataset[self._perm[offset]]


def sample_rng(seed: int, i: int) -> random.Random:
    return random.Random(seed * 1_000_003 + i)


def rank_slice(first: int, last: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of the global sample range [first, last): the ranks'
    shares concatenated in rank order give the range back (sizes differ by at most one)."""
    n = last - first
    lo = first + (n * rank) // world
    hi = first + (n * (rank + 1)) // world
    return range(lo, hi)


class BatchStream(IterableDataset):
    """Batches ``[start + b·B, start + (b+1)·B)`` for b = 0, 1, ...; with DataLoader workers,
    worker w makes the batches b ≡ w (mod workers), which the loader returns in order.

    With ``world > 1`` each global batch is cut into ``world`` contiguous slices and this stream
    yields slice ``rank`` only: positions (and so the data state in checkpoints) stay global,
    and sample i is augmented by the same seeded RNG whichever rank reads it. A source with a
    ``bad_samples`` dict (index -> reason) has the samples it skipped while making a batch
    reported in the batch's ``_bad_samples`` entry ((index, reason) pairs), which the trainer
    takes out before the model sees the batch."""

    def __init__(self, source: Callable[[int], dict], collate: Callable, batch_size: int,
                 start: int = 0, seed: int = 0, limit: int | None = None, rank: int = 0,
                 world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.source, self.collate, self.batch_size = source, collate, batch_size
        self.start, self.seed, self.limit = start, seed, limit
        self.rank, self.world = rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = worker
        while self.limit is None or b * self.batch_size < self.limit:
            first = self.start + b * self.batch_size
            last = first + self.batch_size
            if self.limit is not None:
                last = min(last, self.start + self.limit)
            index = rank_slice(first, last, self.rank, self.world)
            bad = getattr(self.source, "bad_samples", None)
            known = len(bad) if bad is not None else 0
            batch = self.collate([self.source(i) for i in index], [sample_rng(self.seed, i) for i in index])
            if bad is not None and len(bad) > known:  # samples skipped while making this batch
                batch["_bad_samples"] = list(bad.items())[known:]
            yield batch
            b += workers


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGINT. A scheduler (or ``kill -- -PGID``, or Ctrl-C in a
    terminal) signals the whole process group; a worker that died of it would make the main
    process raise in the middle of a step, before the trainer could write the checkpoint it was
    asked for. The main process stops its workers itself when it closes the loader
    (`close_loader`), and kills any left at interpreter exit (`_kill_workers_at_exit`): a
    SIGTERM, which is what multiprocessing sends them then, would be waited on for ever. A
    worker whose parent died exits on its own."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# the worker processes of this process's loaders (they ignore SIGTERM; see above)
_WORKERS: "weakref.WeakSet" = weakref.WeakSet()


class _Loader(DataLoader):
    """A DataLoader that records its worker processes in ``_WORKERS``."""

    def _get_iterator(self):
        it = super()._get_iterator()
        _WORKERS.update(getattr(it, "_workers", ()))
        return it


def _kill(workers) -> None:
    for w in list(workers):
        try:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        except (AssertionError, ValueError, OSError):  # not our child any more, or closed
            pass


@atexit.register
def _kill_workers_at_exit() -> None:
    """Registered after multiprocessing's exit handler, so it runs first: workers still alive
    at exit (a loader not closed because an error went past it) are killed, not terminated by
    a SIGTERM they ignore and then joined for ever."""
    _kill(_WORKERS)


def close_loader(batches) -> None:
    """Stop the worker processes of a DataLoader iterator (if it has any) now, not at garbage
    collection: torch does not shut down an iterator collected at interpreter exit. Workers
    still alive after torch's shutdown are killed. Safe to call twice or on any iterable."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    _kill(getattr(batches, "_workers", ()))


def batch_loader(source, collate, batch_size: int, start: int = 0, seed: int = 0,
                 num_workers: int = 1, limit: int | None = None, rank: int = 0,
                 world: int = 1) -> DataLoader:
    """Batches of the global ``batch_size`` from sample ``start`` on (this rank's slice of each
    when ``world > 1``)."""
    return iterable_loader(BatchStream(source, collate, batch_size, start, seed, limit, rank, world),
                           seed, num_workers)


def iterable_loader(stream: IterableDataset, seed: int = 0, num_workers: int = 1) -> DataLoader:
    """A DataLoader over an iterable of ready batches, with ``num_workers`` worker processes."""
    # a generator of its own: starting an iterator (which draws the workers' base seed) leaves
    # the global RNG untouched, so a resumed run's RNG stream matches an uninterrupted one's
    return _Loader(stream, batch_size=None, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_leave_stop_signals_to_the_trainer if num_workers else None,
                      prefetch_factor=4 if num_workers else None,
                      persistent_workers=False)
