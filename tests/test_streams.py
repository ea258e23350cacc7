"""Task streams over real MNIST: shapes, determinism, per-task transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supsup.data.mnist import MNIST_MEAN, MNIST_STD
from supsup.data.streams import avalanche_permutations, create_stream


def _first(it):
    return next(iter(it))


def test_permuted_stream_permutes_pixels(mnist_data):
    s = create_stream("permuted_mnist", mnist_data, num_tasks=3, seed=0)
    x, y = _first(s.test_batches(1, 16))
    raw = mnist_data["test_images"][:16].reshape(16, -1).float() / 255
    expected = ((raw[:, s.permutations[1]] - MNIST_MEAN) / MNIST_STD).view(16, 1, 28, 28)
    assert torch.allclose(x, expected) and torch.equal(y, mnist_data["test_labels"][:16])
    assert not torch.equal(s.permutations[0], s.permutations[1])
    # task t's permutation depends only on (seed, t)
    s5 = create_stream("permuted_mnist", mnist_data, num_tasks=5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(s.permutations, s5.permutations))


def test_avalanche_permutation_source(mnist_data):
    s = create_stream("permuted_mnist", mnist_data, num_tasks=3, seed=7, permutation_source="avalanche")
    rs = np.random.RandomState(7)
    for p in s.permutations:
        assert p.tolist() == rs.permutation(784).tolist()
    assert len(avalanche_permutations(7, 2)) == 2


def test_train_batches_are_seeded_and_reshuffle(mnist_data):
    s = create_stream("permuted_mnist", mnist_data, num_tasks=2, seed=0)
    a = [y for _, y in s.train_batches(0, 3, 64)]
    b = [y for _, y in s.train_batches(0, 3, 64)]
    c = [y for _, y in s.train_batches(1, 3, 64)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    # more batches than one epoch: 60000 // 20000 = 3 per epoch, then a new order
    assert len(list(s.train_batches(0, 7, 20000))) == 7


def test_rotated_stream_rotates(mnist_data):
    s = create_stream("rotated_mnist", mnist_data, num_tasks=4, seed=0)
    assert s.angles == [0.0, 90.0, 180.0, 270.0]
    x0, _ = _first(s.test_batches(0, 8))
    x2, _ = _first(s.test_batches(2, 8))
    assert torch.allclose(x2, torch.flip(x0, dims=(-2, -1)), atol=1e-6)  # 180 degrees
    s2 = create_stream("rotated_mnist", mnist_data, num_tasks=2, seed=0, angles=[0.0, 10.0])
    assert s2.angles == [0.0, 10.0]


def test_split_stream_classes(mnist_data):
    s = create_stream("split_mnist", mnist_data, num_tasks=5, seed=0)
    assert s.num_classes == 2
    for t in range(5):
        assert s.num_samples(t, "test") == int(((mnist_data["test_labels"] // 2) == t).sum())
        _, y = _first(s.train_batches(t, 1, 256))
        assert set(y.tolist()) <= {0, 1}
    with pytest.raises(ValueError):
        create_stream("split_mnist", mnist_data, num_tasks=6)


def test_test_batches_cover_the_set(mnist_data):
    s = create_stream("permuted_mnist", mnist_data, num_tasks=1)
    sizes = [y.numel() for _, y in s.test_batches(0, 128)]
    assert sum(sizes) == 10000 and sizes[-1] == 10000 % 128
    assert len(list(s.test_batches(0, 128, max_batches=3))) == 3
