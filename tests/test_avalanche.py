"""SupSup inside Avalanche 0.6: the strategy, the cached data path, models for any stream,
the ``backend: avalanche`` runner, and the baselines (small, real, fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from supsup.checkpoint import CheckpointError
from supsup.config import ConfigError, EvalConfig, InferenceConfig, TrainConfig, load_config
from supsup.data.streams import create_stream
from supsup.experiment import run_experiment as _run_experiment
from supsup.integrations.avalanche import (
    ExperienceCache,
    SupSupStrategy,
    TaskInferenceAccuracy,
    benchmark_input_shape,
    benchmark_num_classes,
    in_dataset_order,
    per_experience,
    supsup_model_for_benchmark,
)
from supsup.integrations.baselines import (
    BASELINES,
    GEMPluginFix,
    MultiHeadClassifierFix,
    gem_project,
    make_baseline_strategy,
    packnet_model,
)
from supsup.model import SupermaskModel

ITERATIONS = 60


def run_experiment(cfg, out, **kw) -> dict:
    """The run, as results.json holds it."""
    return _run_experiment(cfg, out, **kw).to_dict()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The two cores are shared with other jobs; with two intra-op threads every small op then
    # waits for the other thread (measured 5x slower). Results do not depend on it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _synthetic_stream(shape, *, num_tasks=3, num_classes=4, n_train=400, n_test=200, seed=0, task_labels=None):
    """Permuted-style synthetic tasks from a seeded generator: class c lights up its own few
    features; task t permutes the features with its own permutation."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    means = torch.zeros(num_classes, d)
    for c in range(num_classes):
        means[c, torch.randperm(d, generator=g)[: max(2, d // 8)]] = 2.0
    train, test = [], []
    for _ in range(num_tasks):
        perm = torch.randperm(d, generator=g)

        def draw(n, perm=perm):
            y = torch.randint(0, num_classes, (n,), generator=g)
            x = means[y] + 0.7 * torch.randn(n, d, generator=g)
            return x[:, perm].reshape(n, *shape), y

        train.append(draw(n_train))
        test.append(draw(n_test))
    labels = list(range(num_tasks)) if task_labels is None else list(task_labels)
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=labels)


class _OptimizerProbe:
    """Records, at each training experience's first step, the optimizer's parameters and the
    model's trainable ones."""

    def __init__(self):
        self.seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == 0:
            params = [p for g in strategy.optimizer.param_groups for p in g["params"]]
            self.seen.append((params, strategy.model.trainable_parameters()))


@pytest.fixture(scope="module")
def permuted2():
    """Avalanche's classic PermutedMNIST (2 experiences, task label 0 everywhere), in MNIST's
    sample order, read from the provisioned root."""
    from avalanche.benchmarks.classic import PermutedMNIST

    from supsup.data.mnist import ensure_mnist

    return in_dataset_order(PermutedMNIST(2, seed=0, dataset_root=ensure_mnist(progress=False)))


@pytest.fixture(scope="module")
def trained_gn(permuted2, tmp_path_factory):
    """The usual Avalanche loop (train an experience, evaluate the whole test stream) with a
    GN SupSup strategy and every kind of logger."""
    logs = tmp_path_factory.mktemp("logs")
    text = open(logs / "log.txt", "w")  # noqa: SIM115 - closed below
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(experience=True), TaskInferenceAccuracy(),
        loggers=[InteractiveLogger(), TextLogger(text), CSVLogger(str(logs / "csv")),
                 TensorboardLogger(tb_log_dir=str(logs / "tb"))])
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=100, num_classes=10, seed=0)
    probe = _OptimizerProbe()
    strategy = SupSupStrategy(model=model, scenario="GN",
                              train_config=TrainConfig(iterations=ITERATIONS, batch_size=64, lr=1e-3),
                              eval_config=EvalConfig(batch_size=128, max_batches=2), evaluator=evaluator,
                              plugins=[probe])
    after_each, steps = [], []
    for exp in permuted2.train_stream:
        strategy.train(exp)
        steps.append(strategy.steps_in_experience)
        after_each.append(strategy.eval(permuted2.test_stream))
    strategy.eval_task = "given"
    given = strategy.eval(permuted2.test_stream)
    text.close()
    return {"strategy": strategy, "after_each": after_each, "given": given, "logs": logs, "probe": probe,
            "steps": steps}


def test_strategy_trains_exactly_the_configured_steps(trained_gn):
    assert trained_gn["steps"] == [ITERATIONS] * 2
    model = trained_gn["strategy"].model
    assert model.num_banked_tasks == 2 and model.active_task is None


def test_strategy_gn_accuracy_matches_gg_and_infers_every_task(trained_gn):
    final = trained_gn["after_each"][-1]
    gn = per_experience(final, "Top1_Acc_Exp")
    gg = per_experience(trained_gn["given"], "Top1_Acc_Exp")
    inferred = per_experience(final, "TaskInference_Acc_Exp")
    assert set(gn) == set(gg) == {0, 1}
    assert min(gg.values()) > 0.7
    assert inferred == {0: 1.0, 1: 1.0}
    assert all(abs(gn[e] - gg[e]) < 1e-9 for e in gg)


def test_strategy_infers_the_task_of_each_image_alone(trained_gn, permuted2):
    """``per_image``: every test image's task inferred from it alone and the image classified
    with that mask (the class-incremental reading), one outcome per image; Avalanche's accuracy
    then equals the native per-image protocol on the same batches."""
    from supsup.evaluation import evaluate_per_image
    from supsup.integrations.avalanche import CachedBatches

    strategy = SupSupStrategy(model=trained_gn["strategy"].model, scenario="GN", per_image=True,
                              eval_config=EvalConfig(batch_size=128, max_batches=2),
                              evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
    acc = per_experience(strategy.eval(permuted2.test_stream), "Top1_Acc_Exp")
    for exp in permuted2.test_stream:
        outcomes = strategy.outcomes[exp.current_experience]
        batches = list(CachedBatches.evaluation(strategy.data_cache.get(exp.dataset, "eval"), batch_size=128,
                                                max_batches=2))
        assert len(outcomes) == sum(len(b[1]) for b in batches) and all(o.size == 1 for o in outcomes)
        native = evaluate_per_image(strategy.model, [(b[0], b[1]) for b in batches], strategy.inference_config, strategy.model.candidates())
        assert acc[exp.current_experience] == pytest.approx(native, abs=1e-9)
        assert sum(o.correct for o in outcomes) / len(outcomes) == pytest.approx(native, abs=1e-9)
        assert native > 0.7
    # a minibatch mixing both tasks' images, alternately: each image gets its own task
    cache = ExperienceCache()
    parts = [cache.get(exp.dataset, "eval").tensors(torch.arange(32)) for exp in permuted2.test_stream]
    x = torch.stack([parts[i % 2].x[i // 2] for i in range(64)])
    y = torch.stack([parts[i % 2].y[i // 2] for i in range(64)])
    mixed = tensors_benchmark(train_tensors=[(x, y)], test_tensors=[(x, y)], task_labels=[0])
    strategy.eval(mixed.test_stream)
    assert [o.inferred_task for o in strategy.outcomes[0]] == [i % 2 for i in range(64)]


def test_strategy_evaluates_unlearned_experiences_honestly(trained_gn):
    """After task 0 only mask 0 exists: GN classifies experience 1 with it (chance level on
    permuted pixels) and reports its task inference as wrong."""
    after_first = trained_gn["after_each"][0]
    acc = per_experience(after_first, "Top1_Acc_Exp")
    inferred = per_experience(after_first, "TaskInference_Acc_Exp")
    assert acc[0] > 0.7 and acc[1] < 0.35
    assert inferred == {0: 1.0, 1: 0.0}


def test_strategy_gg_without_a_mask_is_uniform(permuted2):
    """Task given but not learned yet: uniform logits (loss log 10, argmax class 0)."""
    model = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=10, seed=0)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loss_metrics(experience=True), loggers=[])
    strategy = SupSupStrategy(model=model, scenario="GG", evaluator=evaluator,
                              eval_config=EvalConfig(batch_size=100, max_batches=2))
    exp = permuted2.test_stream[1]
    metrics = strategy.eval([exp])
    labels = ExperienceCache().get(exp.dataset, "eval").tensors(torch.arange(200)).y
    assert per_experience(metrics, "Top1_Acc_Exp")[1] == pytest.approx(float((labels == 0).float().mean()))
    assert per_experience(metrics, "Loss_Exp")[1] == pytest.approx(math.log(10), abs=1e-6)


def test_optimizer_holds_exactly_the_active_scores(trained_gn):
    seen = trained_gn["probe"].seen
    assert len(seen) == 2
    previous: set[int] = set()
    for params, trainable in seen:
        assert [id(p) for p in params] == [id(p) for p in trainable] and len(params) == 3
        assert not previous & {id(p) for p in params}  # finished tasks' scores were dropped
        previous |= {id(p) for p in params}
    model = trained_gn["strategy"].model
    frozen = {id(layer.weight) for layer in model.masked_layers}
    assert not frozen & previous
    assert list(model.parameters()) == []  # between experiences nothing is trainable


def test_loggers_write_supsup_metrics(trained_gn):
    logs = trained_gn["logs"]
    text = (logs / "log.txt").read_text()
    assert "TaskInference_Acc_Exp/eval_phase/test_stream/Task000/Exp001" in text
    csv = (logs / "csv" / "eval_results.csv").read_text().splitlines()
    assert len(csv) > 3 and "eval_accuracy" in csv[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (logs / "tb").rglob("*"))


def test_cached_experience_equals_native_stream(permuted2, mnist_data):
    """Avalanche's PermutedMNIST (seed 0) transformed once == the native stream with
    permutation_source avalanche, bit for bit, in the same order."""
    native = create_stream("permuted_mnist", mnist_data, num_tasks=2, seed=0, permutation_source="avalanche")
    cache = ExperienceCache()
    test = cache.get(permuted2.test_stream[1].dataset, "eval").tensors(torch.arange(10000))
    x, y = native.batch(1, "test", torch.arange(10000))
    assert torch.equal(test.x, x) and torch.equal(test.y, y)
    rows = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:2000]
    train = cache.get(permuted2.train_stream[1].dataset, "train").tensors(rows)
    x, y = native.batch(1, "train", rows)
    assert torch.equal(train.x, x) and torch.equal(train.y, y)


@pytest.mark.parametrize("name", ["split_mnist", "rotated_mnist"])
def test_classic_benchmarks_equal_native_streams(name, mnist_data):
    from supsup.integrations.avalanche import classic_benchmark

    cfg = load_config(None, [f"benchmark.name={name}", "benchmark.num_tasks=2", "model.num_outputs=10",
                             "progress=false"])
    bench = classic_benchmark(cfg)
    native = create_stream(name, mnist_data, num_tasks=2, seed=0)
    n = native.num_samples(1, "test")
    data = ExperienceCache().get(bench.test[1].dataset, "eval").tensors(torch.arange(n))
    x, y = native.batch(1, "test", torch.arange(n))
    assert torch.equal(data.x, x) and torch.equal(data.y, y)
    assert torch.equal(data.t, torch.ones_like(y))


def test_strategy_learns_a_custom_tensor_stream():
    """A stream of 3x8x8 inputs with 4 classes from Avalanche's generic API: the model sizes
    its input layer from the stream, GN matches GG and is far above chance."""
    bench = _synthetic_stream((3, 8, 8))
    assert benchmark_input_shape(bench) == (3, 8, 8) and benchmark_num_classes(bench) == 4
    model = supsup_model_for_benchmark(bench, backbone="lenet_300_100", num_outputs=40, seed=0)
    assert model.masked_layers[0].weight.shape[1] == 192 and model.num_tasks == 3
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), TaskInferenceAccuracy(), loggers=[])
    strategy = SupSupStrategy(model=model, scenario="GN", evaluator=evaluator,
                              train_config=TrainConfig(iterations=100, batch_size=32, lr=1e-2),
                              eval_config=EvalConfig(batch_size=50), inference_config=InferenceConfig(num_images=10))
    for exp in bench.train_stream:
        strategy.train(exp)
    gn = per_experience(strategy.eval(bench.test_stream), "Top1_Acc_Exp")
    strategy.eval_task = "given"
    gg = per_experience(strategy.eval(bench.test_stream), "Top1_Acc_Exp")
    mean_gn, mean_gg = sum(gn.values()) / 3, sum(gg.values()) / 3
    assert mean_gn > 0.8 and abs(mean_gn - mean_gg) <= 0.01


def test_model_fits_feature_vectors():
    bench = _synthetic_stream((20,), num_tasks=2, num_classes=5)
    model = supsup_model_for_benchmark(bench, backbone="fc_300_300", seed=0)
    assert model.masked_layers[0].weight.shape == (300, 20) and model.masked_layers[-1].weight.shape[0] == 5
    strategy = SupSupStrategy(model=model, evaluator=EvaluationPlugin(accuracy_metrics(experience=True),
                                                                                     loggers=[]),
                              train_config=TrainConfig(iterations=80, batch_size=32, lr=1e-2))
    for exp in bench.train_stream:
        strategy.train(exp)
    assert min(per_experience(strategy.eval(bench.test_stream), "Top1_Acc_Exp").values()) > 0.6


def test_strategy_takes_a_user_optimizer():
    """An optimizer built before any task exists (over a placeholder) ends up holding exactly
    the active scores."""
    bench = _synthetic_stream((20,), num_tasks=2, n_train=64, n_test=16)
    model = supsup_model_for_benchmark(bench, backbone="fc_300_300", seed=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    probe = _OptimizerProbe()
    strategy = SupSupStrategy(model=model, optimizer=optimizer, evaluator=None, plugins=[probe],
                              train_config=TrainConfig(iterations=3, batch_size=16))
    for exp in bench.train_stream:
        strategy.train(exp)
    assert strategy.optimizer is optimizer and len(probe.seen) == 2
    assert all([id(p) for p in params] == [id(p) for p in trainable] for params, trainable in probe.seen)


def test_strategy_takes_the_task_from_the_task_label():
    """``task_id_source="task_label"``: three experiences labelled tasks 0, 1, 0 train two
    masks, the third experience training mask 0 further (the experience index would give
    three). Evaluation with the task given reads the label too."""
    bench = _synthetic_stream((20,), num_tasks=3, n_train=64, n_test=32, task_labels=[0, 1, 0])
    model = supsup_model_for_benchmark(bench, backbone="fc_300_300", num_tasks=3, seed=0)
    strategy = SupSupStrategy(model=model, task_id_source="task_label",
                              evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
                              train_config=TrainConfig(iterations=20, batch_size=16, lr=1e-2))
    assert [strategy.task_id_of(e) for e in bench.train_stream] == [0, 1, 0]
    masks = []
    for exp in bench.train_stream:
        strategy.train(exp)
        masks.append(model.task_masks(0))
    assert model.num_learned_tasks == 2 and model.num_banked_tasks == 2
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))  # task 1 left mask 0 alone
    assert not all(torch.equal(a, b) for a, b in zip(masks[1], masks[2]))  # task 0 came back
    strategy.eval_task = "given"
    assert len(per_experience(strategy.eval(bench.test_stream), "Top1_Acc_Exp")) == 3


def test_strategy_rejects_out_of_order_tasks():
    bench = _synthetic_stream((20,), num_tasks=2)
    model = supsup_model_for_benchmark(bench, backbone="fc_300_300", seed=0)
    strategy = SupSupStrategy(model=model, evaluator=None,
                              train_config=TrainConfig(iterations=2, batch_size=8))
    with pytest.raises(ValueError, match="in order"):
        strategy.train(bench.train_stream[1])


# ------------------------------------------------------------------------- the runner

SMALL = ["model.backbone=lenet_300_100", "model.num_outputs=20", "train.iterations=40", "train.lr=1e-3",
         "train.batch_size=32", "eval.max_batches=2", "progress=false", "benchmark.num_tasks=2"]


def _split_cfg(*extra):
    return load_config("configs/split_mnist_gg.yaml", [*SMALL, *extra])


@pytest.mark.parametrize("scenario, extra", [
    ("GG", []),
    ("GN", ["inference.num_images=1", "inference.objective=entropy"]),
    ("NN", ["nn.check_every=10", "nn.min_batches_per_task=10", "inference.num_images=8"]),
    # Bernoulli masks, sampled in every training forward from a per-task generator: the same
    # samples, masks and task inference through either backend
    ("GN", ["mask.kind=bernoulli", "train.lr=0.3", "inference.num_images=8", "inference.objective=entropy"]),
    # likelihood statistics fitted on the same last images of each experience
    ("GN", ["inference.method=likelihood", "inference.num_images=1"]),
])
def test_avalanche_backend_reproduces_native_runner(tmp_path, mnist_data, scenario, extra):
    """Same data, order, init and optimizer: the Avalanche backend's masks classify exactly
    as the native runner's (NN: same detections too), and with the task inferred both score
    the same GN protocol (supsup.evaluation) to the same numbers."""
    native = run_experiment(_split_cfg(f"scenario={scenario}", *extra), tmp_path / "native")
    aval = run_experiment(_split_cfg(f"scenario={scenario}", "backend=avalanche", *extra), tmp_path / "aval")
    # the native loop times its own optimizer steps; Avalanche's loop is Avalanche's
    assert set(native) - {"train_step_seconds"} <= set(aval)
    if scenario != "NN":  # GG/GN: the steps are part of a task's training time
        assert 0 < native["train_step_seconds"] <= native["train_seconds"]
    assert [r["acc_given_task"] for r in aval["tasks"]] == [r["acc_given_task"] for r in native["tasks"]]
    assert aval["mean_acc_given_task"] > 0.7
    saved = json.loads((tmp_path / "aval" / "results.json").read_text())
    assert saved["backend"] == "avalanche" and saved["tasks"] == aval["tasks"]
    assert (tmp_path / "aval" / "config.yaml").is_file() and (tmp_path / "aval" / "accuracy.png").is_file()
    if scenario != "GG":
        for key in ("acc_inferred", "task_inference_acc", "true_rank_counts", "shortlist_recall"):
            assert [r.get(key) for r in aval["tasks"]] == [r.get(key) for r in native["tasks"]], key
        assert aval["task_confusion"] == native["task_confusion"]
    # the accuracy matrix (a row after each task) and its metrics, computed by both backends
    assert aval["accuracy_matrix"] == native["accuracy_matrix"]
    assert native["accuracy_matrix"]["num_tasks_learned"] == [1, 2]
    for key in ("average_accuracy", "bwt", "forgetting"):
        assert aval[key] == native[key], key
    if scenario == "NN":
        assert aval["nn_allocations"] == native["nn_allocations"] and aval["nn_counts"] == native["nn_counts"]


def test_avalanche_backend_refuses_resume_and_torch_permutations(tmp_path):
    with pytest.raises(CheckpointError, match="cannot resume"):
        run_experiment(_split_cfg("backend=avalanche"), tmp_path / "r", resume=True)
    # caught before any work (the backend checks the config): a one-line error naming the key
    with pytest.raises(ConfigError, match="permutation_source"):
        run_experiment(load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "backend=avalanche"]), tmp_path / "p")
    with pytest.raises(ConfigError, match="eval.at_tasks"):
        run_experiment(load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "backend=avalanche",
                                                                      "benchmark.permutation_source=avalanche",
                                                                      "eval.at_tasks=[1]"]), tmp_path / "a")
    assert not (tmp_path / "p").exists() and not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("method", BASELINES.names())
def test_baseline_runs_end_to_end(tmp_path, method):
    scenario = "GG" if method == "packnet" else "GN"
    cfg = _split_cfg("backend=avalanche", f"method={method}", f"scenario={scenario}")
    res = run_experiment(cfg, tmp_path / method)
    saved = json.loads((tmp_path / method / "results.json").read_text())
    assert saved["method"] == method and len(saved["tasks"]) == 2
    key = "acc_given_task" if method == "packnet" else "acc_inferred"
    other = "acc_inferred" if key == "acc_given_task" else "acc_given_task"
    assert all(r[key] is not None and r[other] is None for r in res["tasks"])
    assert res["accuracy_uses_task_id"] == (method == "packnet")
    assert method in res["baseline_hparams"] and "optimizer" in res["baseline_hparams"]
    assert res[f"mean_{key}"] > 0.5  # two-digit tasks, even with forgetting


def test_multihead_baseline_uses_the_task_id(tmp_path):
    res = run_experiment(_split_cfg("backend=avalanche", "method=naive", "scenario=GG"), tmp_path / "mh")
    assert res["head"] == "multi" and res["accuracy_uses_task_id"]
    assert res["mean_acc_given_task"] > 0.9  # one head per digit pair: no forgetting of heads


def test_packnet_needs_the_task_id(tmp_path):
    with pytest.raises(ConfigError, match="packnet"):
        run_experiment(_split_cfg("backend=avalanche", "method=packnet", "scenario=GN"), tmp_path / "x")


class _Probe:
    def __init__(self):
        self.calls = 0

    def before_training_exp(self, strategy, **kwargs):
        self.calls += 1


def test_packnet_keeps_user_plugins():
    """avalanche-lib 0.6.0's PackNet wrapper nests the user's plugins in a list
    (``plugins=[plugins, PackNetPlugin]``), so they are never called."""
    from avalanche.training import PackNet

    bench = _synthetic_stream((20,), num_tasks=1, n_train=64, n_test=16)
    upstream_probe, probe = _Probe(), _Probe()
    upstream_model = packnet_model(torch.nn.Sequential(torch.nn.Linear(20, 4)))
    upstream = PackNet(model=upstream_model, optimizer=torch.optim.Adam(upstream_model.parameters()),
                       post_prune_epochs=1, prune_proportion=0.5, train_epochs=2, train_mb_size=16,
                       plugins=[upstream_probe], evaluator=None)
    upstream.train(bench.train_stream[0])
    assert upstream_probe.calls == 0  # the defect we work around
    model = packnet_model(torch.nn.Sequential(torch.nn.Linear(20, 4)))
    ours = make_baseline_strategy("packnet", model=model, num_tasks=1, iterations=8, train_mb_size=16,
                                  eval_mb_size=16, plugins=[probe])
    ours.train(bench.train_stream[0])
    assert probe.calls == 1 and ours.clock.train_exp_iterations == 8


def test_packnet_model_handles_bias_free_layers():
    """avalanche-lib 0.6.0 decides ``has_bias`` from the weight; freezing a bias-free layer
    then sets ``requires_grad`` on ``None``."""
    from avalanche.models.packnet import PackNetModel

    def net():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 4, bias=False))

    upstream = PackNetModel(net())
    upstream.prune(0.5)
    with pytest.raises(AttributeError):
        upstream.freeze_pruned()
    ours = packnet_model(net())
    ours.prune(0.5)
    ours.freeze_pruned()
    assert ours.task_count == 1


def test_multihead_classifier_accepts_class_sets():
    """avalanche-lib 0.6.0's MultiHeadClassifier indexes a tensor with
    ``classes_in_this_experience``, which ``with_classes_timeline`` makes a set."""
    from avalanche.benchmarks import with_classes_timeline
    from avalanche.models import MultiHeadClassifier

    bench = with_classes_timeline(_as_clscenario(_synthetic_stream((6,), num_tasks=2, n_train=32, n_test=8)))
    exp = bench.train_stream[1]
    assert isinstance(exp.classes_in_this_experience, set)
    with pytest.raises((TypeError, IndexError)):
        MultiHeadClassifier(6, initial_out_features=4).adaptation(exp)
    head = MultiHeadClassifierFix(6, initial_out_features=4)
    head.adaptation(exp)
    assert head(torch.zeros(3, 6), 1).shape == (3, 4)


def _as_clscenario(bench):
    """A tensors_benchmark rebuilt with the generic API (what with_classes_timeline decorates)."""
    from avalanche.benchmarks import benchmark_from_datasets, with_task_labels

    return with_task_labels(benchmark_from_datasets(train=[e.dataset for e in bench.train_stream],
                                                    test=[e.dataset for e in bench.test_stream]))


def test_gem_projection_solves_the_dual_qp():
    """GEM without quadprog: the projected gradient matches a generic solver of the same dual
    QP, and its inner product with every memory gradient is non-negative (up to the 1e-3
    ridge GEM adds to the dual)."""
    from scipy.optimize import minimize

    g_ = torch.Generator().manual_seed(0)
    memories = torch.randn(4, 50, generator=g_)
    g = -memories.sum(0) + 0.3 * torch.randn(50, generator=g_)
    margin = 0.5
    out = gem_project(memories, g, margin)
    assert float((memories @ g).min()) < 0 and float((memories @ out).min()) > -1e-2
    m, gv = memories.double().numpy(), g.double().numpy()
    p = m @ m.T + 1e-3 * torch.eye(4).double().numpy()
    res = minimize(lambda v: 0.5 * v @ p @ v + (m @ gv) @ v, x0=torch.ones(4).double().numpy(),
                   jac=lambda v: p @ v + m @ gv, bounds=[(margin, None)] * 4, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12})
    assert torch.allclose(out, torch.from_numpy(res.x @ m + gv).float(), atol=1e-4)
    plugin = GEMPluginFix(patterns_per_experience=4, memory_strength=margin)
    plugin.G = memories
    assert torch.allclose(plugin.solve_quadprog(g), out, atol=1e-5)


def test_readme_avalanche_example_runs(mnist_data):
    """The README's Avalanche example, as written, with two experiences and 30 steps each
    (the only edits) so that it stays fast: it must build, train and log."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Avalanche"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "PermutedMNIST(5," in code and 'scenario="GN",' in code
    code = code.replace("PermutedMNIST(5,", "PermutedMNIST(2,")
    code = code.replace('scenario="GN",', 'scenario="GN", train_config=TrainConfig(iterations=30),')
    namespace = {"TrainConfig": TrainConfig}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    strategy = namespace["strategy"]
    assert strategy.model.num_learned_tasks == 2 and strategy.steps_in_experience == 30
    metrics = strategy.evaluator.get_last_metrics()
    assert any(k.startswith("Top1_Acc_Exp/eval_phase/test_stream") for k in metrics)


def test_resnet18_through_the_strategy_on_avalanche_split_cifar100(tmp_path, monkeypatch, write_cifar100):
    """Avalanche's own SplitCIFAR100 (dataset_root) drives a ResNet-18 with per-task BatchNorm
    through the strategy. The CIFAR files are small synthetic ones in the real format, so
    torchvision's digest check of the real archive is switched off for this test only."""
    import torchvision
    from avalanche.benchmarks.classic import SplitCIFAR100

    write_cifar100(tmp_path, n_train=1000, n_test=200)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    bench = SplitCIFAR100(n_experiences=20, seed=0, return_task_id=True, class_ids_from_zero_in_each_exp=True,
                          dataset_root=str(tmp_path))
    model = supsup_model_for_benchmark(bench, backbone="resnet18", seed=0, num_tasks=2)
    assert benchmark_input_shape(bench) == (3, 32, 32) and model.num_classes == 5 and model.norm_layers
    strategy = SupSupStrategy(model=model, scenario="GG", evaluator=EvaluationPlugin(accuracy_metrics(experience=True),
                                                                                     loggers=[]),
                              train_config=TrainConfig(iterations=3, batch_size=16, optimizer="adam", lr=1e-3),
                              eval_config=EvalConfig(batch_size=25, max_batches=1))
    for exp in list(bench.train_stream)[:2]:
        strategy.train(exp)
    acc = per_experience(strategy.eval(list(bench.test_stream)[:2]), "Top1_Acc_Exp")
    assert sorted(acc) == [0, 1] and model.num_banked_tasks == 2
    assert model.norm_layers[0].num_stats == 2


def test_strategy_keeps_the_former_num_classes_argument_and_the_model_helper_takes_norm_and_score_init():
    """The previous release's SupSupStrategy(model=..., num_classes=10) still works (deprecated):
    a model built without classes takes them, an equal value is accepted, a conflict is an error;
    supsup_model_for_benchmark passes norm and score_init on."""
    bench = _synthetic_stream((1, 8, 8))
    free = SupermaskModel.from_name("fc_300_300", num_tasks=3, num_outputs=40, input_shape=(1, 8, 8))
    with pytest.warns(FutureWarning, match=r"SupermaskModel\(\.\.\., num_classes=4\)"):
        SupSupStrategy(model=free, num_classes=4)
    assert free.num_classes == 4
    with pytest.warns(FutureWarning, match="drop the argument"):
        SupSupStrategy(model=free, num_classes=4)
    with pytest.raises(ValueError, match="conflicts with the model's num_classes 4"):
        SupSupStrategy(model=free, num_classes=7)
    model = supsup_model_for_benchmark(bench, backbone="conv4_bn", seed=0, norm="batch", score_init="transfer")
    assert model.score_init == "transfer" and model.norm_layers and model.norm_layers[0].norm == "batch"


def test_classes_a_task_does_not_answer_get_a_finite_logit_below_its_own():
    """Class-incremental: the classes a task does not answer are -inf in its logits; what the
    strategy gives Avalanche keeps the argmax, and a batch given the wrong task has a loss on the
    scale of the logits (about 20 more), not about 10,000."""
    from supsup.integrations.avalanche.strategy import EXCLUDED_MARGIN, finite_logits

    model = SupermaskModel.from_name("fc_300_300", num_tasks=2, num_outputs=4, input_shape=(1, 8, 8))
    model.add_task()
    model.finish_task()
    model.set_task_classes(0, [0, 1])
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with model.use_task(0):
        raw = model.class_logits(x)
    assert torch.isneginf(raw[:, 2:]).all() and torch.isfinite(raw[:, :2]).all()
    out = finite_logits(raw)
    assert torch.isfinite(out).all() and torch.equal(out.argmax(1), raw.argmax(1))
    assert torch.equal(out[:, :2], raw[:, :2])
    assert torch.allclose(out[:, 2], raw[:, :2].amin(1) - EXCLUDED_MARGIN)
    wrong = torch.nn.functional.cross_entropy(out, torch.full((16,), 3))  # labels the task does not answer
    spread = float((raw[:, :2].amax(1) - raw[:, :2].amin(1)).max())
    assert EXCLUDED_MARGIN <= float(wrong) <= EXCLUDED_MARGIN + spread + math.log(4)
    assert torch.equal(finite_logits(out), out)  # nothing excluded: unchanged
