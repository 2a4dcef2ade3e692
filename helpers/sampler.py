"""Epoch samplers for training: class-balanced (upstream MAEST) and uniform, DDP-aware.

An epoch is ``epoch_length`` draws, not one pass over the data (Discogs has millions of
tracks). Every rank makes the same draw from a generator seeded with ``(seed, epoch)`` and
keeps its share ``draw[rank::world_size]``, so the ranks see disjoint parts of one epoch and a
run is reproducible whatever the number of GPUs. The draw is padded (wrapping around) so
every rank gets ``ceil(epoch_length / world_size)`` indices and the ranks stay in step.

Each yielded index is a ``Draw``: an ``int`` (the track) that also says which epoch and which
position of the epoch's draw picked it, so the training set can seed that draw's random crop
with it (crops then depend neither on DataLoader workers nor on where a run was resumed).
``resume(epoch, start)`` makes the next iteration start part-way through an epoch: exact resume.

Use these with ``Trainer(use_distributed_sampler=False)``: Lightning would otherwise wrap them
in its own distributed sampler and shard each rank's share a second time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Upstream MAEST / PaSST class balancing: weight 1000 / (count + offset); the offset keeps
# the rarest classes from dominating an epoch.
CLASS_WEIGHT_SCALE = 1000.0
CLASS_COUNT_OFFSET = 100.0


def balanced_weights(labels: np.ndarray) -> torch.Tensor:
    """Per-track sampling weights (float64 ``(N,)``) from multi-hot ``labels (N, C)``.

    A track weighs the sum of ``1000 / (count + 100)`` over its classes; a track with no label
    gets the smallest class weight, so it is still drawn, as rarely as the commonest class.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"labels must be a non-empty multi-hot array (n_tracks, n_classes), got shape {labels.shape}")
    # Chunked: a float copy of millions of tracks x hundreds of classes would take gigabytes.
    chunks = range(0, labels.shape[0], 65536)
    counts = sum(np.count_nonzero(labels[i : i + 65536] > 0, axis=0) for i in chunks)  # (C,)
    class_weights = CLASS_WEIGHT_SCALE / (counts + CLASS_COUNT_OFFSET)  # (C,)
    weights = np.concatenate([(labels[i : i + 65536] > 0) @ class_weights for i in chunks])  # (N,)
    weights[weights == 0] = class_weights.min()  # tracks with no label
    return torch.from_numpy(weights)


SAMPLERS = ("balanced", "random")  # datamodule.sampler: BalancedSampler, RandomEpochSampler


class Draw(int):
    """A track index drawn by an epoch sampler; ``epoch`` and ``position`` (in the epoch's whole
    draw, all ranks) say which draw it is. It is an ``int`` everywhere else."""

    epoch: int
    position: int

    def __new__(cls, track: int, epoch: int, position: int):
        draw = super().__new__(cls, track)
        draw.epoch, draw.position = epoch, position
        return draw

    def __reduce__(self):  # DataLoader workers receive indices pickled
        return (Draw, (int(self), self.epoch, self.position))

    def __repr__(self) -> str:
        return f"Draw(track={int(self)}, epoch={self.epoch}, position={self.position})"


def draw_seed(seed: int, epoch: int) -> int:
    """The 32-bit seed of an epoch's draw (torch's CPU generator reads 32 bits): ``epoch + seed * 2654435761``.

    ``seed + epoch`` made seed k's draws seed 0's shifted by k epochs; Knuth's multiplier spreads the
    seeds so far apart that no two of them (up to 10 000 apart) meet within 340 000 epochs.
    Seed 0 keeps its draws: ``epoch``.
    """
    return (epoch + seed * 2654435761) % 2**32


class _EpochSampler(Sampler[int]):
    """Draws ``epoch_length`` indices per epoch and yields this rank's share of them."""

    def __init__(self, n_items: int, epoch_length: int, seed: int, rank: int, world_size: int, replacement: bool):
        if n_items < 1:
            raise ValueError(f"a sampler needs at least one item to draw from, got {n_items}")
        if epoch_length < 1:
            raise ValueError(f"epoch_length must be positive, got {epoch_length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.n_items = n_items
        self.epoch_length = epoch_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.replacement = replacement
        self.epoch = 0
        self._start = 0  # this rank's index where the next iteration starts (see resume)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch: a new epoch gets a new draw."""
        self.epoch = epoch

    def resume(self, epoch: int, start: int) -> None:
        """Make the next iteration yield epoch ``epoch`` from this rank's ``start``-th index on
        (the ones before it were trained on before a kill); later iterations start at 0."""
        if not 0 <= start <= len(self):
            raise ValueError(f"cannot resume at index {start} of an epoch of {len(self)} indices per rank")
        self.epoch = epoch
        self._start = start

    def __len__(self) -> int:
        return math.ceil(self.epoch_length / self.world_size)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def epoch_indices(self) -> torch.Tensor:
        """The whole draw of the current epoch, padded to a multiple of ``world_size`` (all ranks)."""
        generator = torch.Generator().manual_seed(draw_seed(self.seed, self.epoch))
        indices = self._draw(generator)
        assert len(indices) == self.epoch_length
        total = len(self) * self.world_size
        if total > len(indices):
            indices = torch.cat([indices, indices[: total - len(indices)]])
        return indices

    def __iter__(self) -> Iterator[Draw]:
        start, self._start = self._start, 0
        epoch, tracks = self.epoch, self.epoch_indices()[self.rank :: self.world_size].tolist()
        positions = range(self.rank, len(tracks) * self.world_size, self.world_size)
        return (Draw(t, epoch, p) for t, p in zip(tracks[start:], positions[start:]))


class BalancedSampler(_EpochSampler):
    """Class-balanced draws (upstream MAEST): tracks of rare classes are drawn more often.

    ``labels`` is the multi-hot training ground truth ``(N, C)``; see ``balanced_weights``.
    torch.multinomial draws from at most 2**24 tracks.
    """

    def __init__(
        self,
        labels: np.ndarray,
        epoch_length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        replacement: bool = True,
    ):
        self.weights = balanced_weights(labels)
        super().__init__(len(self.weights), epoch_length, seed, rank, world_size, replacement)
        if not replacement and epoch_length > self.n_items:
            raise ValueError(
                f"cannot draw epoch_length={epoch_length} of {self.n_items} tracks without replacement "
                f"(datamodule.sampler_replacement=False, upstream's setting): set datamodule.sampler_replacement=True "
                f"or datamodule.epoch_length={self.n_items} or less"
            )

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.weights, self.epoch_length, self.replacement, generator=generator)


class RandomEpochSampler(_EpochSampler):
    """Uniform draws over ``n_items`` tracks; without replacement an epoch longer than the data
    chains several shuffles, so every track is seen once before any is seen twice."""

    def __init__(
        self,
        n_items: int,
        epoch_length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        replacement: bool = True,
    ):
        super().__init__(n_items, epoch_length, seed, rank, world_size, replacement)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        if self.replacement:
            return torch.randint(0, self.n_items, (self.epoch_length,), generator=generator)
        n_shuffles = math.ceil(self.epoch_length / self.n_items)
        shuffles = [torch.randperm(self.n_items, generator=generator) for _ in range(n_shuffles)]
        return torch.cat(shuffles)[: self.epoch_length]
