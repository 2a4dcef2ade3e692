import math

import numpy as np
import pytest
import torch

from helpers.sampler import BalancedSampler, RandomEpochSampler, balanced_weights


def _labels(n_common: int = 900, n_rare: int = 100) -> np.ndarray:
    """Tracks 0..n_common-1 carry class 0, the rest carry class 1."""
    labels = np.zeros((n_common + n_rare, 2), dtype=bool)
    labels[:n_common, 0] = True
    labels[n_common:, 1] = True
    return labels


def test_balanced_weights_values():
    labels = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)  # class counts 2, 1
    w = balanced_weights(labels)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([1000 / 102, 1000 / 102 + 1000 / 101, 1000 / 102], dtype=torch.float64))
    torch.testing.assert_close(balanced_weights(labels.astype(np.float32)), w)  # float ground truths too
    with pytest.raises(ValueError, match="n_tracks, n_classes"):
        balanced_weights(np.zeros(3, dtype=bool))


def test_balanced_sampler_favours_rare_classes():
    sampler = BalancedSampler(labels=_labels(), epoch_length=5000, seed=0)
    drawn = np.array(list(sampler))
    # weights 1000/1000 = 1 (common) and 1000/200 = 5 (rare): rare share 500 / 1400, not 0.1
    rare_share = (drawn >= 900).mean()
    assert abs(rare_share - 500 / 1400) < 0.03
    assert len(drawn) == len(sampler) == 5000


def test_sampler_is_seeded_by_seed_and_epoch():
    a = BalancedSampler(labels=_labels(), epoch_length=50, seed=1)
    b = BalancedSampler(labels=_labels(), epoch_length=50, seed=1)
    assert list(a) == list(b) and list(a) == list(a)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BalancedSampler(labels=_labels(), epoch_length=50, seed=2)) != first


@pytest.mark.parametrize("cls", ["balanced", "random"])
def test_each_seed_is_its_own_stream_not_another_seeds_shifted_by_epochs(cls):
    """The generator was seeded with seed + epoch: seed 1's epoch 0 was seed 0's epoch 1."""
    def sampler(seed):
        return BalancedSampler(labels=_labels(), epoch_length=50, seed=seed) if cls == "balanced" else RandomEpochSampler(1000, 50, seed=seed)

    def draw(seed, epoch):
        s = sampler(seed)
        s.set_epoch(epoch)
        return [int(i) for i in s]

    assert draw(1, 0) != draw(0, 1) and draw(2, 3) != draw(0, 5)
    # seed 0 keeps the stream it had: the demo's draws, and every figure measured on them
    assert sampler(0)._draw(torch.Generator().manual_seed(3)).tolist() == draw(0, 3)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("cls", ["balanced", "random"])
def test_ddp_ranks_share_one_draw(world_size, cls):
    labels = _labels(60, 40)

    def make(rank, ws):
        kwargs = dict(epoch_length=47, seed=5, rank=rank, world_size=ws, replacement=False)
        if cls == "balanced":
            return BalancedSampler(labels=labels, **kwargs)
        return RandomEpochSampler(n_items=len(labels), **kwargs)

    whole = list(make(0, 1))
    assert len(set(whole)) == 47  # without replacement: every index once
    shares = [list(make(rank, world_size)) for rank in range(world_size)]
    per_rank = math.ceil(47 / world_size)
    assert all(len(s) == per_rank == len(make(r, world_size)) for r, s in enumerate(shares))
    # interleaving the shares gives back the single-process draw, padded by wrapping around
    interleaved = [shares[i % world_size][i // world_size] for i in range(per_rank * world_size)]
    assert interleaved == whole + whole[: per_rank * world_size - 47]
    # disjoint and covering (the padding repeats at most world_size - 1 indices)
    seen = [i for s in shares for i in s]
    assert set(seen) == set(whole)
    assert len(seen) - len(set(seen)) == per_rank * world_size - 47


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="without replacement"):
        BalancedSampler(labels=_labels(5, 5), epoch_length=11, replacement=False)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        BalancedSampler(labels=_labels(), epoch_length=10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="epoch_length must be positive"):
        RandomEpochSampler(n_items=10, epoch_length=0)


def test_random_sampler_without_replacement_sees_every_item_before_repeating():
    sampler = RandomEpochSampler(n_items=20, epoch_length=50, seed=0, replacement=False)
    drawn = list(sampler)
    assert sorted(drawn[:20]) == list(range(20)) and sorted(drawn[20:40]) == list(range(20))
    assert np.bincount(drawn, minlength=20).min() >= 2
    with_replacement = list(RandomEpochSampler(n_items=20, epoch_length=500, seed=0))
    assert min(with_replacement) >= 0 and max(with_replacement) <= 19 and len(set(with_replacement)) == 20
