"""Task inference picks the right task, and the GN protocol scores what it claims to.

Masks trained on PermutedMNIST tasks (real MNIST, LeNet 300-100, a few seconds) are told
apart from a single image by every method and objective; a wrong choice of sign or of the
candidates' coefficients shows up as wrong tasks, not as a shape or a range.
"""

from __future__ import annotations

import math

import pytest
import torch

from supsup import evaluation, inference
from supsup.candidates import Candidates
from supsup.config import InferenceConfig, TrainConfig
from supsup.data.streams import create_stream
from supsup.evaluation import evaluate_given_task, evaluate_inferred
from supsup.inference import infer_tasks
from supsup.model import Mode, ModeError, SupermaskModel
from supsup.training import train_task

NUM_TASKS = 4


@pytest.fixture(scope="module")
def permuted(mnist_data):
    """Four PermutedMNIST tasks learned by LeNet 300-100 with 90 superfluous outputs."""
    stream = create_stream("permuted_mnist", mnist_data, num_tasks=NUM_TASKS, seed=0)
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=NUM_TASKS + 1, num_outputs=100, num_classes=10,
                                     seed=0)
    for t in range(NUM_TASKS):
        train_task(model, stream.train_batches(t, 100, 64), TrainConfig(lr=1e-3))
    return model, stream


def _groups(stream, task_id: int, groups: int, images: int) -> torch.Tensor:
    x, _ = next(stream.test_batches(task_id, groups * images))
    return x.view(groups, images, *x.shape[1:])


@pytest.mark.parametrize("method", ["one_shot", "binary", "likelihood"])
@pytest.mark.parametrize("objective", ["entropy", "g"])
@pytest.mark.parametrize("images", [1, 8])
def test_infer_tasks_finds_the_task_of_every_group(permuted, method, objective, images):
    """Each of 12 groups per task, from 1 or 8 test images, is assigned its own task (measured:
    all of them). Picking the largest gradient instead of the smallest finds none."""
    model, stream = permuted
    for t in range(NUM_TASKS):
        tasks, steps = inference.infer_tasks(model, _groups(stream, t, 12, images), method=method,
                                             objective=objective, num_classes=10)
        assert tasks.tolist() == [t] * 12, (t, tasks.tolist())
        assert steps == {"one_shot": 1, "binary": 2, "likelihood": 0}[method]  # binary: log2(4) halvings


def test_infer_task_defaults_to_one_shot_g_and_finds_the_task(permuted):
    """``infer_task`` (the Python API): one batch, its task from the first image by default."""
    model, stream = permuted
    assert inference.default_objective(model) == "g"
    for t in range(NUM_TASKS):
        x, _ = next(stream.test_batches(t, 64))
        assert inference.infer_task(model, x, num_images=1) == t
        assert inference.infer_task(model, x[5:], method="binary") == t


def test_binary_search_superposes_its_survivors_uniformly(permuted, monkeypatch):
    """Every binary-search step puts alpha = 1/count on each surviving candidate and 0 on the
    dropped ones (paper Alg. 2 renormalises over the survivors): counts 4, 2 for four masks."""
    model, stream = permuted
    seen: list[torch.Tensor] = []
    real = inference._alpha_gradients

    def spy(model, x, alphas, *args):
        seen.append(alphas.clone())
        return real(model, x, alphas, *args)

    monkeypatch.setattr(inference, "_alpha_gradients", spy)
    inference.infer_tasks(model, _groups(stream, 2, 3, 4), method="binary", objective="entropy", num_classes=10)
    assert len(seen) == 2
    for alphas, count in zip(seen, (4, 2)):
        alive = alphas > 0
        assert (alive.sum(dim=1) == count).all()
        assert torch.equal(alphas[alive], torch.full((3 * count,), 1.0 / count))
        assert torch.allclose(alphas.sum(dim=1), torch.ones(3))
    assert (seen[1][:, 2] == 0.5).all()  # task 2 survives the first halving in every group


def test_gn_counts_a_batch_with_a_wrong_task_as_all_wrong(permuted, monkeypatch):
    """The paper's protocol: a test batch classified with a wrongly inferred mask scores 0,
    even when that mask would have classified some images right. Inference is forced wrong
    on every other batch; the accuracy is then exactly the right batches' GG hits."""
    model, stream = permuted
    batches = list(stream.test_batches(1, 128, 6))
    acc_given, per_batch = evaluate_given_task(model, batches, 1)

    def every_other_wrong(model, x, candidates, **kw):
        first = torch.tensor([1 if i % 2 == 0 else 3 for i in range(x.shape[0])])
        rest = torch.tensor([[t for t in (1, 0, 2, 3) if t != f] for f in first.tolist()])  # task 1 second
        return inference.TaskRanking(torch.cat([first.unsqueeze(1), rest], dim=1), NUM_TASKS, 1)

    monkeypatch.setattr(evaluation, "rank_among", every_other_wrong)
    total = sum(n for _, n in per_batch)
    for given in (per_batch, None):  # the right batches scored from the GG counts, or again
        res = evaluate_inferred(model, batches, 1, InferenceConfig(group_size=128), model.candidates(), per_batch_given=given)
        assert res.task_inference_acc == 0.5
        assert res.acc_inferred == sum(c for c, _ in per_batch[0::2]) / total
        # where the batch's own task stood: chosen, or second behind the wrong one
        assert res.true_rank_counts == {0: 3, 1: 3} and res.shortlist_recall == 1.0
    assert acc_given == sum(c for c, _ in per_batch) / total
    assert 0.3 < res.acc_inferred < acc_given - 0.3  # wrong batches score nothing


def test_evaluating_a_task_restores_the_mode(permuted):
    """``evaluate_given_task`` selects the task's mask; afterwards the model is back where it
    was: training the active task (forward = its scores) or idle (forward refused)."""
    trained, stream = permuted
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=NUM_TASKS + 1, num_outputs=100, num_classes=10,
                                     seed=0)
    model.load_bank_state(trained.bank_state())
    batches = list(stream.test_batches(0, 64, 1))
    x, _ = next(stream.test_batches(0, 8))
    evaluate_given_task(model, batches, 0)
    assert model.mode is Mode.IDLE
    with pytest.raises(ModeError):
        model(x)
    task = model.add_task()
    before = model(x).detach()
    evaluate_given_task(model, batches, 0)
    assert model.mode is Mode.TRAIN and model.current_task == task
    assert torch.equal(model(x).detach(), before)


def test_gn_infers_every_batch_from_its_own_first_images(mnist_data, monkeypatch):
    """Regression: batches share an inference pass in groups, and a group used the size of its
    smallest batch for all of them; the last test batch of MNIST (16 images) made 15 batches
    of 128 infer their task from 16 images only (RotatedMNIST task inference fell to 0.95)."""
    stream = create_stream("permuted_mnist", mnist_data, num_tasks=2, seed=0)
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=100, num_classes=10, seed=0)
    for _ in range(2):
        model.add_task()
        model.finish_task()
    seen: list[int] = []
    real = evaluation.rank_among

    def spy(model, x, candidates, **kw):
        seen.extend([x.shape[1]] * x.shape[0])
        return real(model, x, candidates, **kw)

    monkeypatch.setattr(evaluation, "rank_among", spy)
    batches = list(stream.test_batches(1, 128))
    evaluate_inferred(model, batches, 1, InferenceConfig(num_images=128, group_size=32), model.candidates())
    sizes = [min(128, x.shape[0]) for x, _ in batches]
    assert sizes[-1] == 16 and sorted(seen) == sorted(sizes)


def test_groups_shrink_to_fit_the_activation_memory(mnist_data, monkeypatch):
    """A group of 128 test batches of 128 images through a conv net holds tens of GB of
    activations: ``inference.memory_mb`` bounds the images of one pass (a ResNet-18 GN
    evaluation was killed for memory before it did)."""
    stream = create_stream("permuted_mnist", mnist_data, num_tasks=2, seed=0)
    model = SupermaskModel.from_name("conv2", num_tasks=2, num_outputs=10, seed=0, input_shape=(1, 28, 28))
    for _ in range(2):
        model.add_task()
        model.finish_task()
    per_image = evaluation.activation_bytes_per_image(model, torch.zeros(1, 1, 28, 28))
    assert per_image > 64 * 26 * 26 * 4  # at least the first conv's output
    assert evaluation.activation_bytes_per_image(model, torch.ones(1, 1, 28, 28)) == per_image  # sizes only
    assert model.mode is Mode.IDLE  # the measuring pass leaves the model as it was
    passes: list[int] = []
    real = evaluation.rank_among

    def spy(model, x, candidates, **kw):
        passes.append(x.shape[0] * x.shape[1])
        return real(model, x, candidates, **kw)

    monkeypatch.setattr(evaluation, "rank_among", spy)
    batches = list(stream.test_batches(1, 128, 6))
    budget = 3 * per_image * 300 / 2**20  # room for 300 images: two batches of 128 per pass
    small = evaluate_inferred(model, batches, 1, InferenceConfig(num_images=128, objective="entropy",
                                                                   memory_mb=max(1, round(budget))), model.candidates())
    assert max(passes) <= 300 and len(passes) == 3
    passes.clear()
    big = evaluate_inferred(model, batches, 1, InferenceConfig(num_images=128, objective="entropy"), model.candidates())
    assert passes == [6 * 128] and big == small


@pytest.mark.parametrize("method", ["one_shot", "binary"])
def test_group_size_changes_speed_not_results(mnist_data, method):
    """``inference.group_size`` only sets how many inferences share a pass over the bank (and
    so whether the compiled kernel or unpack + matmul computes it): it is resume-free, so it
    must not change any inferred task."""
    stream = create_stream("permuted_mnist", mnist_data, num_tasks=5, seed=0)
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=5, num_outputs=100, num_classes=10, seed=0)
    for t in range(5):
        train_task(model, stream.train_batches(t, 60, 64), TrainConfig(lr=1e-3))
    for task in (0, 4):
        batches = list(stream.test_batches(task, 128, 12))
        results = [evaluate_inferred(model, batches, task,
                                     InferenceConfig(method=method, objective="entropy", group_size=g), model.candidates())
                   for g in (1, 5, 128)]
        assert results[0] == results[1] == results[2]
        assert results[0].task_inference_acc > 0.5  # real inference, not a degenerate constant


def test_exact_objectives_equal_each_mask_alone(permuted):
    """refine exact evaluates the objective under each shortlisted mask alone: the same as
    running that task's mask (objective of the task-mode forward)."""
    from supsup.objectives import exact_score

    model, stream = permuted
    x = _groups(stream, 2, 3, 4)
    shortlist = torch.tensor([[0, 2, 3], [1, 2, 0], [3, 1, 2]])
    for objective in ("entropy", "g"):
        exact = inference.exact_objectives(model, x, shortlist, model.candidates(), objective=objective, num_classes=10)
        for g in range(3):
            for slot, t in enumerate(shortlist[g].tolist()):
                with model.use_task(t):
                    ref = exact_score(objective)(model(x[g]).unsqueeze(0), 10)[0]
                assert torch.allclose(exact[g, slot], ref, rtol=1e-5), (objective, g, t)
    warm = inference.exact_objectives(model, x, shortlist, model.candidates(), objective="entropy", num_classes=10, temperature=2.5)
    with model.use_task(3):
        ref = exact_score("entropy")(model(x[0]).unsqueeze(0) / 2.5, 10)[0]
    assert torch.allclose(warm[0, 2], ref, rtol=1e-5) and not torch.allclose(warm, exact)
    assert model.mode is Mode.IDLE


def test_the_refine_temperature_reaches_the_exact_objective(permuted, monkeypatch):
    """inference.refine_temperature goes from the evaluation settings to the exact scores."""
    model, stream = permuted
    seen: list[float] = []
    real = inference.exact_objectives

    def spy(*args, temperature=1.0, **kw):
        seen.append(temperature)
        return real(*args, temperature=temperature, **kw)

    monkeypatch.setattr(inference, "exact_objectives", spy)
    batches = list(stream.test_batches(1, 16, 2))
    cfg = InferenceConfig(method="binary", objective="entropy", num_images=16, refine="exact", refine_temperature=2.0)
    evaluate_inferred(model, batches, 1, cfg, model.candidates())
    assert seen and set(seen) == {2.0}


@pytest.mark.parametrize("method", ["one_shot", "binary"])
def test_refine_exact_picks_the_shortlisted_mask_with_the_lowest_objective(permuted, method):
    model, stream = permuted
    x = torch.cat([_groups(stream, t, 3, 2) for t in range(NUM_TASKS)])  # 12 groups of 2 images
    tasks, steps = inference.infer_tasks(model, x, method=method, objective="entropy", refine="exact",
                                         refine_candidates=NUM_TASKS)
    exact = inference.exact_objectives(model, x, torch.arange(NUM_TASKS).expand(12, NUM_TASKS), model.candidates(), objective="entropy",
                                       num_classes=10)
    assert torch.equal(tasks, exact.argmin(dim=1))
    assert tasks.tolist() == [t for t in range(NUM_TASKS) for _ in range(3)]
    assert steps == (1 if method == "one_shot" else 0)  # binary: 4 candidates, shortlist of 4: no halving
    tasks2, steps2 = inference.infer_tasks(model, x, method="binary", objective="entropy", refine="exact",
                                           refine_candidates=2)
    assert tasks2.tolist() == tasks.tolist() and steps2 == 1


@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_refine_exact_finds_the_task_with_either_objective(permuted, objective):
    """Regression: G's value is dominated by the (detached) real-class logits, which are largest
    under the right mask, so comparing masks by G's value picked a wrong task every time (task
    inference 0.0 on RotatedMNIST); the exact score for G is the superfluous outputs' part."""
    model, stream = permuted
    x = torch.cat([_groups(stream, t, 3, 2) for t in range(NUM_TASKS)])
    tasks, _ = inference.infer_tasks(model, x, method="binary", objective=objective, refine="exact",
                                     refine_candidates=NUM_TASKS, num_classes=10)
    assert tasks.tolist() == [t for t in range(NUM_TASKS) for _ in range(3)]


def test_class_incremental_split_mnist_end_to_end(mnist_data, tmp_path):
    """labels global: digits keep their labels, each task answers among its own two; the task
    is inferred per batch and per image (likelihood: each task's class Gaussians), both
    reported; the run's per-image accuracy at the top of results.json."""
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    cfg = load_config("configs/split_mnist_gnu.yaml", [
        "benchmark.num_tasks=3", "model.backbone=lenet_300_100", "train.iterations=100", "train.lr=1e-3",
        "eval.max_batches=2", "progress=false"])
    assert cfg.benchmark.num_classes == 10
    res = run_experiment(cfg, tmp_path / "run").to_dict()
    assert res["task_inference_acc"] == 1.0 and res["mean_acc_inferred"] > 0.9
    # measured 0.983 (the exact entropy of each image under each mask: about 0.7)
    assert 0.9 < res["mean_acc_inferred_per_image"] <= res["mean_acc_inferred"] + 0.05
    assert res["acc_inferred_per_image"] == res["mean_acc_inferred_per_image"]
    assert all(r["acc_inferred_per_image"] is not None for r in res["tasks"])


def test_objective_values_by_hand():
    """H, G and the exact score of G on logits whose values are known: (groups, images,
    outputs) -> (groups,); 2 real classes and 2 superfluous outputs."""
    from supsup.objectives import entropy, exact_score, superfluous_g, superfluous_lse

    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 3.0]],
                           [[1.0, 1.0, -1.0, -1.0], [0.0, 5.0, 0.0, 0.0]]])
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    ent = lambda *v: -sum(p * math.log(p) for p in [math.exp(x - lse(*v)) for x in v])  # noqa: E731
    rows = logits.tolist()
    for fn, ref in ((entropy, ent), (superfluous_g, lse), (superfluous_lse, lambda *v: lse(*v[2:]))):
        want = torch.tensor([sum(ref(*img) for img in g) / 2 for g in rows])
        assert torch.allclose(fn(logits, 2), want, atol=1e-6), fn.__name__
        assert torch.allclose(fn(logits[0], 2), want[0], atol=1e-6)  # one group: (images, outputs)
    assert exact_score("g") is superfluous_lse and exact_score("entropy") is entropy
    for fn in (superfluous_g, superfluous_lse):
        with pytest.raises(ValueError, match="objective 'g' needs superfluous neurons: 4 outputs for 4 classes"):
            fn(logits, 4)


def test_gn_batches_are_inferred_with_the_configured_search():
    """evaluation.infer_batch_masks runs infer_tasks with every key of the inference config:
    on 8 untrained masks and noise, binary search with log_base 8 (one step) and 2 (three
    steps) pick differently for some batches, and the GN path follows the config's."""
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=8, num_outputs=20, num_classes=10)
    for _ in range(8):
        model.add_task()
        model.finish_task()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(4, 1, 28, 28, generator=g) for _ in range(24)]
    picks = {}
    for base in (2.0, 8.0):
        cfg = InferenceConfig(method="binary", objective="entropy", num_images=4, log_base=base)
        picks[base] = evaluation.infer_batch_masks(model, images, cfg, model.candidates())
        direct = inference.infer_tasks(model, torch.stack(images), method="binary", objective="entropy",
                                       num_classes=10, log_base=base)[0]
        assert picks[base] == direct.tolist()
    assert picks[2.0] != picks[8.0]


def test_gn_evaluation_infers_among_the_candidates_it_is_given():
    """A curve point after n tasks passes the bank's first n masks as the candidates: batches
    are then inferred among those only, never as a later mask."""
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=3, num_outputs=20, num_classes=10)
    for _ in range(3):
        model.add_task()
        model.finish_task()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(24)]
    cfg = InferenceConfig(method="one_shot", objective="entropy", num_images=4)
    whole = evaluate_inferred(model, batches, 2, cfg, model.candidates())
    assert set(whole.inferred_counts) - {0, 1}  # over the whole bank some batch goes to mask 2
    prefix = evaluate_inferred(model, batches, 2, cfg, model.candidates(num_banked=2))
    assert set(prefix.inferred_counts) <= {0, 1} and prefix.task_inference_acc == 0.0
    # earlier versions' row lists still work, with a warning, and mean the same candidates
    x = torch.stack([b[0] for b in batches[:6]])
    with pytest.warns(FutureWarning, match="candidates="):
        old, _ = infer_tasks(model, x, objective="entropy", packed=[layer.bank_rows[:2] for layer in model.masked_layers])
    new, _ = infer_tasks(model, x, objective="entropy", candidates=model.candidates(num_banked=2))
    assert torch.equal(old, new)
    with pytest.raises(TypeError, match="not both"):
        infer_tasks(model, x, candidates=model.candidates(), extra=[r[:1] for r in model.candidates().rows()])


def test_a_candidate_set_needs_one_row_per_candidate_in_every_layer():
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=10)
    model.add_task()
    model.finish_task()
    rows = model.candidates().rows()
    with pytest.raises(ValueError, match="one row per candidate"):
        Candidates((tuple(rows[:1]), (rows[1].repeat(2, 1),), (rows[2],)), (0,))
    with pytest.raises(IndexError, match="num_banked must be in 0..1"):
        model.candidates(num_banked=2)
