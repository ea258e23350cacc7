"""Likelihood inference: the Gaussian maths against torch's own densities, the statistics a task
banks (bytes, storage, reload), and task inference from one image on real MNIST."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from supsup import infer_task, inference
from supsup.config import InferenceConfig, TrainConfig
from supsup.data.streams import create_stream
from supsup.evaluation import likelihood_table
from supsup.likelihood import (
    ClassGaussians,
    LikelihoodSpec,
    TaskLikelihood,
    choose_rank,
    class_gaussian_nll,
    fit_class_gaussians,
    pack_likelihoods,
    stats_nbytes,
    unpack_likelihoods,
)
from supsup.model import ModeError, SupermaskModel
from supsup.training import CalibrationBuffer, learn_task, train_task


def _random_gaussians(c: int, r: int, d: int, seed: int = 0) -> ClassGaussians:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(c, d, r, generator=g))[0].transpose(1, 2)  # orthonormal rows
    noise = torch.rand(c, generator=g) + 0.1
    eig = noise.unsqueeze(1) + torch.rand(c, r, generator=g) * 3
    return ClassGaussians(means=torch.randn(c, d, generator=g), basis=basis.half(), eigvals=eig, noise=noise)


@pytest.mark.parametrize("c, r", [(1, 0), (1, 3), (3, 2), (4, 5)])
def test_nll_is_the_mixture_of_the_full_covariance_gaussians(c, r):
    """``class_gaussian_nll`` = ``-log((1/c) sum_c N(x; mu_c, V diag(lam) V^T + s2 (I - V V^T)))``,
    against torch's MultivariateNormal with the covariance written out."""
    d = 7
    g = _random_gaussians(c, r, d)
    x = torch.randn(9, d, generator=torch.Generator().manual_seed(1)) * 2
    logps = []
    for i in range(c):
        v = g.basis[i].double()
        cov = v.t() @ torch.diag(g.eigvals[i].double()) @ v + g.noise[i].double() * (torch.eye(d, dtype=torch.float64) - v.t() @ v)
        logps.append(MultivariateNormal(g.means[i].double(), covariance_matrix=cov).log_prob(x.double()))
    want = -(torch.logsumexp(torch.stack(logps), 0) - math.log(c))
    # (the directions are stored in fp16: orthonormal to about 1e-3)
    assert torch.allclose(class_gaussian_nll(x, g).double(), want, rtol=1e-3)


def test_fit_is_the_maximum_likelihood_ppca_of_each_class():
    """Per class: the mean, the top eigenvectors and eigenvalues of the (biased) covariance, and
    the mean of the other eigenvalues as the rest variance (Tipping & Bishop's ML solution)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    y = torch.arange(300) % 2
    g = fit_class_gaussians(x, y, rank=2)
    assert g.num_classes == 2 and g.rank == 2
    for c in range(2):
        xc = x[y == c].double()
        cov = torch.cov(xc.t(), correction=0)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        assert torch.allclose(g.means[c].double(), xc.mean(0), atol=1e-5)
        assert torch.allclose(g.eigvals[c].double(), evals.flip(0)[:2], rtol=1e-5)
        assert torch.allclose(g.noise[c].double(), evals[:4].mean(), rtol=1e-5)
        top = evecs[:, -2:].flip(1).t()
        assert torch.allclose((g.basis[c].double() @ top.t()).abs(), torch.eye(2, dtype=torch.float64), atol=2e-3)
    with pytest.raises(ValueError, match="class 0 has 2 calibration images, rank 2 needs more than 2"):
        fit_class_gaussians(x[:4], torch.tensor([0, 1, 0, 1]), rank=2)


def test_choose_rank_is_the_largest_that_fits_the_budget():
    dims = [100, 50]
    for budget in (5_000, 20_000, 40_000):
        r = choose_rank(budget, dims, groups=3, max_rank=64, min_group_size=1000)
        assert stats_nbytes(dims, 3, r) <= budget < stats_nbytes(dims, 3, r + 1)
    assert choose_rank(10**9, dims, 1, max_rank=8, min_group_size=1000) == 8  # the cap
    assert choose_rank(10**9, dims, 1, max_rank=64, min_group_size=5) == 4  # fewer directions than images
    assert choose_rank(10, dims, 1, max_rank=8, min_group_size=100) == -1  # not even the means
    # a narrow layer keeps fewer directions than its width, the others the task's rank
    assert choose_rank(10**9, [100, 10], 1, max_rank=32, min_group_size=1000) == 32
    assert stats_nbytes([100, 10], 1, 32) == (100 * 4 + 32 * (100 * 2 + 4) + 4) + (10 * 4 + 9 * (10 * 2 + 4) + 4)


def test_packed_statistics_round_trip_and_are_checked():
    tasks = [TaskLikelihood([_random_gaussians(2, 3, 5, 0), _random_gaussians(2, 3, 4, 1)]), None,
             TaskLikelihood([_random_gaussians(1, 4, 5, 2), _random_gaussians(1, 3, 4, 3)])]  # rank 4: 3 in width 4
    state = pack_likelihoods(tasks)
    back = unpack_likelihoods(state, 3, [5, 4])
    assert back[1] is None
    for a, b in ((tasks[0], back[0]), (tasks[2], back[2])):
        for ga, gb in zip(a.layers, b.layers):
            for f in ("means", "basis", "eigvals", "noise"):
                assert torch.equal(getattr(ga, f), getattr(gb, f))
    assert pack_likelihoods([None, None]) == {} and unpack_likelihoods({}, 2, [5, 4]) == [None, None]
    bad = dict(state, **{"1.means": state["1.means"][:-1]})
    with pytest.raises(ValueError, match=r"likelihood.1.means: expected torch.float32 \(3, 4\)"):
        unpack_likelihoods(bad, 3, [5, 4])
    with pytest.raises(ValueError, match="likelihood statistics have keys"):
        unpack_likelihoods({k: v for k, v in state.items() if k != "0.noise"}, 3, [5, 4])
    with pytest.raises(ValueError, match="likelihood.rank: expected int64"):
        unpack_likelihoods(state, 4, [5, 4])


def test_calibration_buffer_keeps_the_last_images_in_order():
    buf = CalibrationBuffer(10)
    for i in range(5):
        buf.add(torch.full((4, 2), float(i)), torch.full((4,), i))
    x, y = buf.tensors()
    assert len(buf) == 10 and x.shape == (10, 2)
    assert y.tolist() == [2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    assert len(buf._batches) == 3  # at most one batch more than it needs
    other = CalibrationBuffer(10)
    other.load_state(buf.state())
    assert torch.equal(other.tensors()[0], x)


@pytest.fixture(scope="module")
def permuted(mnist_data):
    """Three PermutedMNIST tasks learned by LeNet 300-100 (likelihood statistics banked)."""
    stream = create_stream("permuted_mnist", mnist_data, num_tasks=3, seed=0)
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=4, num_outputs=100, num_classes=10, seed=0,
                                     likelihood=LikelihoodSpec(images=512))
    reports = [learn_task(model, stream.train_batches(t, 100, 64), TrainConfig(lr=1e-3)) for t in range(3)]
    return model, stream, reports


def test_each_task_banks_statistics_of_its_last_images_within_its_mask_bytes(permuted):
    model, stream, reports = permuted
    budget = model.mask_nbytes
    for t in range(3):
        stats = model.task_likelihood(t)
        assert 0 < stats.nbytes() <= budget
        assert [g.means.shape[1] for g in stats.layers] == [300, 100]  # the hidden layers' outputs
        # fitted on the task's last 512 training images, under its own banked mask
        x, y = reports[t].calibration.tensors()
        assert x.shape[0] == 512
        batches = list(stream.train_batches(t, 100, 64))
        assert torch.equal(x, torch.cat([b[0] for b in batches])[-512:])
        again = SupermaskModel.from_name("lenet_300_100", num_tasks=4, num_outputs=100, num_classes=10, seed=0)
        again.load_bank_state({k: v for k, v in model.bank_state().items() if not k.startswith("likelihood.")})
        refit = again.fit_likelihood(t, x, y)
        for a, b in zip(stats.layers, refit.layers):
            assert torch.equal(a.means, b.means) and torch.equal(a.basis, b.basis)
    # ten classes cannot each keep 16 directions in LeNet's 39 KB: one Gaussian per task
    assert model.task_likelihood(0).layers[0].num_classes == 1
    assert model.bank_bytes == (sum(layer.bank_nbytes() for layer in model.masked_layers)
                                + sum(model.task_likelihood(t).nbytes() for t in range(3)))


def test_a_task_with_few_classes_keeps_a_gaussian_per_class(mnist_data):
    stream = create_stream("split_mnist", mnist_data, num_tasks=5, seed=0)
    model = SupermaskModel.from_name("fc_300_300", num_tasks=1, num_outputs=2, num_classes=2, seed=0,
                                     likelihood=LikelihoodSpec(images=256, max_rank=8))
    train_task(model, stream.train_batches(0, 20, 64))
    stats = model.task_likelihood(0)
    assert [g.num_classes for g in stats.layers] == [2, 2] and stats.layers[0].rank == 8


def test_one_image_is_enough_to_find_its_task(permuted):
    """Every test image of every task, alone, under every banked mask: its own task's mask
    explains its features best (measured: all 3 x 200 images)."""
    model, stream, _ = permuted
    for t in range(3):
        x, _ = next(stream.test_batches(t, 200))
        tasks, steps = inference.infer_tasks(model, x.unsqueeze(1), method="likelihood")
        assert steps == 0 and (tasks == t).float().mean() >= 0.99
        assert infer_task(model, x[:1]) == t  # the API's default: likelihood when every task has statistics


def test_scores_are_each_masks_own_and_any_prefix_gives_the_state_after_n_tasks(permuted):
    """``likelihood_table`` scores every batch under every banked mask in one pass; the first n
    columns decide exactly as inference over the bank's first n masks (a curve point)."""
    model, stream, _ = permuted
    images = [x[:2] for t in range(3) for x, _ in stream.test_batches(t, 64, 3)]
    cfg = InferenceConfig(method="likelihood", num_images=2)
    table = likelihood_table(model, images, cfg)
    for n in (2, 3):
        tasks, _ = inference.infer_tasks(model, torch.stack(images), method="likelihood",
                                         candidates=model.candidates(num_banked=n))
        assert torch.equal(table[:, :n].argmin(1), tasks)
    # the table is a sum of per-image scores of each mask alone
    single = inference.likelihood_scores(model, images[4][:1], [1])
    x1 = images[4][1:2]
    assert torch.allclose(table[4, 1], single[0, 0] + inference.likelihood_scores(model, x1, [1])[0, 0])


def test_statistics_survive_save_load_and_change_the_bank_digest(permuted, tmp_path):
    model, stream, _ = permuted
    model.save(tmp_path / "m.supsup")
    loaded = SupermaskModel.load(tmp_path / "m.supsup")
    assert loaded.bank_sha256() == model.bank_sha256()
    x, _ = next(stream.test_batches(1, 16))
    assert torch.equal(inference.likelihood_scores(loaded, x, [0, 1, 2]),
                       inference.likelihood_scores(model, x, [0, 1, 2]))
    bare = SupermaskModel.from_name("lenet_300_100", num_tasks=4, num_outputs=100, num_classes=10, seed=0)
    bare.load_bank_state({k: v for k, v in model.bank_state().items() if not k.startswith("likelihood.")})
    assert bare.bank_sha256() != model.bank_sha256()  # the statistics are part of the bank
    with pytest.raises(inference.InferenceError, match="3 banked tasks have no likelihood statistics"):
        inference.infer_tasks(bare, x[:1].unsqueeze(0), method="likelihood")
    assert inference.default_method(bare) == "one_shot"


def test_a_model_without_likelihood_banks_masks_only(mnist_data):
    stream = create_stream("permuted_mnist", mnist_data, num_tasks=1, seed=0)
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=1, num_outputs=10, seed=0, likelihood=None)
    train_task(model, stream.train_batches(0, 5, 32))
    assert model.task_likelihood(0) is None
    assert not [k for k in model.bank_state() if k.startswith("likelihood")]
    with pytest.raises(ModeError, match="keeps no likelihood statistics"):
        model.fit_likelihood(0, *next(stream.test_batches(0, 8)))
