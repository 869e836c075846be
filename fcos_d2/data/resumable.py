"""A training data loader whose position can be saved and restored exactly: ``--resume`` continues
with the very batches an uninterrupted run would have seen.

Detectron2's ``TrainingSampler`` and the augmentations draw from random streams that restart when
a resumed run rebuilds the loader, so a resumed run sees other images in another order. Here:

- each process's samples are numbered (its *positions*); position p of process r is the
  ``(p * world_size + r)``-th draw of a stream made of epochs, each a permutation of the dataset
  seeded by ``(seed, epoch)``, so any position is reached in O(dataset), without replaying
  batches (:class:`IndexStream`);
- each sample's augmentations are seeded by ``(seed, position)`` (:func:`sample_randomness`), so a
  sample maps to the same tensors in whichever loader process and whenever it is mapped;
- loader process w of W maps positions w, w + W, ...: batches arrive in position order for any
  ``DATALOADER.NUM_WORKERS``;
- the state is the next position and the positions waiting in the aspect-ratio groups; restoring
  it re-maps those few samples (:class:`ResumableTrainLoader`).

Samples are drawn as Detectron2's ``TrainingSampler`` draws them (shuffled epochs, processes
taking every world_size-th draw); other ``DATALOADER.SAMPLER_TRAIN`` samplers keep Detectron2's own
loader, and resuming them is not exact.
"""

import contextlib
import itertools
import logging
import random
import signal
from collections.abc import Iterator
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..utils import stop_daemon_processes_at_exit

logger = logging.getLogger(__name__)

_current_sample: Optional[tuple[int, int]] = None  # (seed, position) of the sample being mapped


class IndexStream:
    """Dataset indices of one process, addressable by position: epoch e of the stream is a
    permutation of ``range(size)`` seeded by ``(seed, e)``, and process ``rank`` of
    ``world_size`` takes every ``world_size``-th draw."""

    def __init__(
        self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if size <= 0:
            raise ValueError("the training dataset is empty")
        self.size, self.shuffle, self.rank, self.world_size = size, shuffle, rank, world_size
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)
        self._permutations: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position * self.world_size + self.rank, self.size)
        if not self.shuffle:
            return offset
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            # The current epoch and the next are enough: positions only move forward.
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = torch.randperm(self.size, generator=generator)
        return int(self._permutations[epoch][offset])


def _mix(*numbers: int) -> int:
    """A well-spread 63-bit seed from a few non-negative integers."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


@contextlib.contextmanager
def sample_randomness(seed: int, position: int) -> Iterator[None]:
    """Inside the block, ``random``, ``np.random`` and torch's CPU generator are seeded from
    ``(seed, position)``; after it, in the training process, they continue as before, as if the
    block had not run (a loader process maps nothing else: its generators are left seeded)."""
    global _current_sample
    in_worker = get_worker_info() is not None
    numpy_state = None if in_worker else np.random.get_state()
    python_state, previous = random.getstate(), _current_sample
    value = _mix(seed, position)
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed also seeds every accelerator, 100x slower.
        torch.default_generator.manual_seed(value)
        np.random.seed(value % 2**32)
        random.seed(value)
        _current_sample = (seed, position)
        try:
            yield
        finally:
            _current_sample = previous
            if numpy_state is not None:
                np.random.set_state(numpy_state)
            random.setstate(python_state)


def current_sample() -> Optional[tuple[int, int]]:
    """``(seed, position)`` while a :class:`ResumableTrainLoader` maps a sample, else None: lets
    an augmentation draw per batch of positions (e.g. one size for a whole batch)."""
    return _current_sample


def block_rng(block: int) -> Optional[np.random.Generator]:
    """A generator seeded by the current sample's seed and ``block`` (e.g. its batch number), or
    None outside a :class:`ResumableTrainLoader`."""
    if _current_sample is None:
        return None
    return np.random.default_rng(_mix(_current_sample[0], block, 0xB10C))


class PositionedSamples(IterableDataset):
    """``(position, mapped sample)`` from position ``start`` on; loader process w of W maps
    positions ``start + w``, ``start + w + W``, ... A mapper may return None (sample skipped)."""

    def __init__(self, dataset: DatasetFromList, mapper: Callable, stream: IndexStream):
        self.dataset, self.mapper, self.stream = dataset, mapper, stream
        self.start = 0

    def map(self, position: int) -> Any:
        with sample_randomness(self.stream.seed, position):
            return self.mapper(self.dataset[self.stream.index(position)])

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for position in itertools.count(self.start + first, step):
            yield position, self.map(position)


def _identity(sample: Any) -> Any:
    return sample


def _loader_worker_init(worker_id: int) -> None:
    # The training process handles preemption signals (checkpoint, then exit); a worker that
    # died of one first would stop training with a data loader error instead. The training
    # process stops its workers at its exit (_named_worker_failures).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _named_worker_failures(loader: DataLoader, num_workers: int) -> Iterator:
    """``loader``'s items; a loader process that died (killed, out of memory) is reported as such
    instead of torch's generic error."""
    if num_workers > 0:
        stop_daemon_processes_at_exit()  # they ignore SIGTERM: multiprocessing cannot stop them
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            if "DataLoader worker" not in str(error):
                raise
            died = str(error)
        else:
            continue
        # Shut the other loader processes down now (the error's traceback, which held the
        # iterator, is gone here): they ignore SIGTERM, so left to the interpreter's exit they
        # would keep the training process from ending.
        del iterator
        raise RuntimeError(
            f"a training data loader process died ({died}): killed, or out of memory? "
            f"Training stopped; --resume continues from the last checkpoint. Fewer "
            f"DATALOADER.NUM_WORKERS (now {num_workers}) need less memory; 0 maps the "
            "data in the training process."
        )


class ResumableTrainLoader:
    """Batches (lists of mapped samples) for training, with ``state_dict`` / ``load_state_dict``:
    consecutive positions, grouped by aspect ratio as Detectron2's ``AspectRatioGroupedDataset``
    groups them (width > height or not), incomplete groups kept for later."""

    def __init__(
        self,
        samples: PositionedSamples,
        batch_size: int,
        *,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        collate_fn: Optional[Callable] = None,
        **loader_kwargs,
    ):
        self.samples, self.batch_size = samples, batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.loader_kwargs = loader_kwargs
        self._next_position = 0
        self._waiting: list[list[int]] = [[], []]  # positions in each aspect-ratio group
        self._iterating = False

    @property
    def seed(self) -> int:
        return self.samples.stream.seed

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_position": self._next_position,
            "waiting": [list(group) for group in self._waiting],
            "seed": self.seed,
            "rank": self.samples.stream.rank,
            "world_size": self.samples.stream.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterating:
            raise RuntimeError("the training data loader's state can only be loaded before it runs")
        stream = self.samples.stream
        if (state["rank"], state["world_size"]) != (stream.rank, stream.world_size):
            logger.warning(
                "resuming with %d processes where the checkpoint was written with %d: the data "
                "continues, but not with the batches an uninterrupted run would have seen",
                stream.world_size,
                state["world_size"],
            )
        stream.set_seed(state["seed"])
        self._next_position = int(state["next_position"])
        self._waiting = [list(group) for group in state["waiting"]]

    def __iter__(self) -> Iterator[Any]:
        self._iterating = True
        groups: list[list[tuple[int, Any]]] = [
            [(p, self.samples.map(p)) for p in group] for group in self._waiting
        ]
        self.samples.start = self._next_position
        loader = DataLoader(
            self.samples,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_loader_worker_init,
            # A generator of its own: creating the iterator leaves the global one untouched.
            generator=torch.Generator(),
            **self.loader_kwargs,
        )
        for position, sample in _named_worker_failures(loader, self.num_workers):
            self._next_position = position + 1
            if sample is None:
                continue
            group = groups[self._group_of(sample)]
            group.append((position, sample))
            if len(group) == self.batch_size:
                batch = [s for _, s in group]
                group.clear()
                self._waiting = [[p for p, _ in g] for g in groups]
                yield self.collate_fn(batch) if self.collate_fn else batch
            else:
                self._waiting = [[p for p, _ in g] for g in groups]

    def _group_of(self, sample: dict) -> int:
        if not self.aspect_ratio_grouping:
            return 0
        return 0 if sample["width"] > sample["height"] else 1


def build_resumable_train_loader(
    dataset: Union[list, DatasetFromList],
    *,
    mapper: Callable,
    sampler=None,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
    seed: Optional[int] = None,
    **kwargs,
):
    """Detectron2's ``build_detection_train_loader`` (same arguments, usable in LazyConfig files
    in its place), resumable exactly. A ``sampler`` other than None (Detectron2's
    ``TrainingSampler`` order) or an iterable dataset keeps Detectron2's own loader."""
    if sampler is not None or isinstance(dataset, IterableDataset):
        logger.warning(
            "a custom sampler or iterable dataset: Detectron2's train loader is used, and "
            "--resume continues training without the exact batches of an uninterrupted run"
        )
        return build_detection_train_loader(
            dataset,
            mapper=mapper,
            sampler=sampler,
            total_batch_size=total_batch_size,
            aspect_ratio_grouping=aspect_ratio_grouping,
            num_workers=num_workers,
            collate_fn=collate_fn,
            **kwargs,
        )
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"total batch size {total_batch_size} must be a positive multiple of the "
            f"{world_size} processes"
        )
    if not isinstance(dataset, DatasetFromList):
        # Serialized: each access returns a fresh copy, and loader processes share the bytes.
        dataset = DatasetFromList(dataset, copy=False)
    seed = comm.shared_random_seed() if seed is None or seed < 0 else seed
    stream = IndexStream(len(dataset), seed, rank=comm.get_rank(), world_size=world_size)
    return ResumableTrainLoader(
        PositionedSamples(dataset, mapper, stream),
        total_batch_size // world_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
        collate_fn=collate_fn,
        **kwargs,
    )


def build_train_loader_from_cfg(cfg: CfgNode, mapper: Callable):
    """The training loader of a yacs config (as Detectron2's ``build_detection_train_loader(cfg,
    mapper=...)``): resumable with ``DATALOADER.SAMPLER_TRAIN: TrainingSampler``, Detectron2's
    own for the other samplers. Its order is seeded by ``SEED`` (random when negative)."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.warning(
            "DATALOADER.SAMPLER_TRAIN=%s: Detectron2's train loader is used, and --resume "
            "continues without the exact batches of an uninterrupted run (TrainingSampler only)",
            cfg.DATALOADER.SAMPLER_TRAIN,
        )
        return build_detection_train_loader(cfg, mapper=mapper)
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON
        else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return build_resumable_train_loader(
        dataset,
        mapper=mapper,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=cfg.SEED,
    )
