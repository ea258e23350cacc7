"""The Python API for a user's own loop: train from DataLoaders, use_task, predict, save and
load, infer_task; the README's example runs as written."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import supsup
from supsup import (
    CapacityError,
    Mode,
    ModeError,
    SupermaskModel,
    TrainConfig,
    infer_task,
    train_task,
)
from supsup.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def _loader(task: int, n: int = 256, seed: int = 0) -> DataLoader:
    """Synthetic 4-class task ``task``: class c lights up its own features, permuted per task."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(task))
    means = torch.zeros(4, 64)
    for c in range(4):
        means[c, 16 * c: 16 * c + 16] = 2.0
    y = torch.randint(0, 4, (n,), generator=g)
    x = (means[y] + 0.5 * torch.randn(n, 64, generator=g))[:, perm]
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def _model(**kw) -> SupermaskModel:
    kw = {"num_tasks": 3, "num_outputs": 40, "num_classes": 4, "input_shape": (64,), **kw}
    return SupermaskModel.from_name("fc_300_300", **kw)


@pytest.fixture(scope="module")
def trained() -> SupermaskModel:
    model = _model()
    for task in range(2):
        assert train_task(model, _loader(task), TrainConfig(lr=1e-2), epochs=3) == task
    return model


def test_train_task_learns_each_task_from_a_dataloader(trained):
    assert trained.num_banked_tasks == 2 and trained.mode is Mode.IDLE and trained.active_task is None
    for task in range(2):
        x, y = next(iter(_loader(task, seed=1)))
        with trained.use_task(task):
            assert (trained.predict(x) == y).float().mean() > 0.9


def test_train_task_counts_steps_and_epochs():
    """``max_steps`` runs exactly that many steps (passing over the loader as often as needed);
    ``epochs`` passes over it; a one-shot iterator is read once."""
    steps = []

    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    from supsup import optim

    optim.OPTIMIZERS.register("counting_sgd")(lambda params, lr, momentum, weight_decay: Counting(params, lr=lr))
    try:
        cfg = TrainConfig(optimizer="counting_sgd", lr=1e-2)
        model = _model()
        train_task(model, _loader(0), cfg, max_steps=19)  # 8 batches per pass
        assert len(steps) == 19
        steps.clear()
        train_task(model, _loader(1), cfg, epochs=3)
        assert len(steps) == 24
        steps.clear()
        train_task(model, iter(_loader(2)), cfg, max_steps=100)
        assert len(steps) == 8
    finally:
        optim.OPTIMIZERS._items.pop("counting_sgd")


def test_a_failed_training_leaves_no_half_task():
    """An exception mid-task (bad labels) leaves nothing in the bank and the id free."""
    model = _model()
    bad = DataLoader(TensorDataset(torch.randn(8, 64), torch.full((8,), 99)), batch_size=4)
    with pytest.raises(IndexError):
        train_task(model, bad)
    assert model.active_task is None and model.num_learned_tasks == 0 and model.mode is Mode.IDLE
    assert train_task(model, _loader(0), max_steps=2) == 0


def test_use_task_restores_the_mode(trained):
    x, _ = next(iter(_loader(0)))
    with trained.use_task(1):
        assert trained.mode is Mode.TASK and trained.current_task == 1
    assert trained.mode is Mode.IDLE
    with pytest.raises(ModeError):
        trained(x)
    model = _model()
    model.add_task()
    before = model(x)
    with pytest.raises(RuntimeError, match="boom"), model.use_task(0):
        raise RuntimeError("boom")  # restored on the way out of an exception too
    assert model.mode is Mode.TRAIN and torch.equal(model(x), before)


def test_predict_never_picks_a_superfluous_neuron():
    model = _model(num_outputs=40, num_classes=4)
    model.add_task()
    with torch.no_grad():
        for layer in model.masked_layers[-1:]:  # make superfluous outputs 4..39 the largest
            layer.base_layer.weight[4:] = 10.0
            layer.base_layer.weight[:4] = -10.0
    x = torch.rand(16, 64)
    assert model(x).argmax(dim=1).min() >= 4
    assert model.predict(x).max() < 4


def test_num_classes_is_checked():
    with pytest.raises(ValueError, match="num_classes"):
        _model(num_outputs=10, num_classes=11)
    assert _model(num_outputs=10, num_classes=None).num_classes == 10


def test_save_and_load_give_identical_outputs(trained, tmp_path):
    path = tmp_path / "m.supsup"
    trained.save(path)
    loaded = SupermaskModel.load(path)
    assert loaded.num_banked_tasks == 2 and loaded.num_classes == 4 and loaded.num_tasks == 3
    assert loaded.frozen_weights_digest() == trained.frozen_weights_digest()
    x = torch.randn(32, 64)
    for task in range(2):
        with trained.use_task(task), loaded.use_task(task):
            assert torch.equal(trained(x), loaded(x))
    # the loaded model keeps learning: the next task is 2, and the bank is full after it
    assert train_task(loaded, _loader(2), max_steps=3) == 2
    with pytest.raises(CapacityError):
        loaded.add_task()


def test_saving_a_task_in_training_is_refused(tmp_path):
    model = _model()
    model.add_task()
    with pytest.raises(ModeError, match="finish_task"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_corrupt_and_foreign_model_files_are_refused(trained, tmp_path):
    path = tmp_path / "m.supsup"
    trained.save(path)
    raw = path.read_bytes()
    (tmp_path / "flip").write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    with pytest.raises(CheckpointError, match="checksum does not match"):
        SupermaskModel.load(tmp_path / "flip")
    (tmp_path / "short").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="checksum does not match"):
        SupermaskModel.load(tmp_path / "short")
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(CheckpointError, match="not a supsup model file"):
        SupermaskModel.load(tmp_path / "foreign")
    with pytest.raises(CheckpointError, match="no model file"):
        SupermaskModel.load(tmp_path / "absent")


def test_a_run_checkpoint_is_not_a_model_file(tmp_path):
    from supsup.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, {}, {"loop": {}})
    with pytest.raises(CheckpointError, match="is a supsup checkpoint, not a supsup model file"):
        SupermaskModel.load(tmp_path / "checkpoint.pt")


def test_custom_backbones_are_saved_and_checked(tmp_path):
    """A user's module: with the paper's init (default) its weights come from the model's seed,
    so any fresh instance reloads it; with weight_init='keep' its own weights are the identity,
    and another instance's weights are refused. A wrapped module gets a plain error."""
    def backbone(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))

    x = torch.randn(4, 64)
    for init in ("signed_constant", "keep"):
        model = SupermaskModel(backbone(0), num_tasks=2, num_classes=4, weight_init=init)
        train_task(model, _loader(0), max_steps=3)
        model.save(tmp_path / init)
        with pytest.raises(CheckpointError, match=r"custom backbone: pass it as SupermaskModel\.load\(path, backbone=module\)"):
            SupermaskModel.load(tmp_path / init)
        loaded = SupermaskModel.load(tmp_path / init, backbone=backbone(0))
        assert loaded.weight_init == init
        with model.use_task(0), loaded.use_task(0):
            assert torch.equal(model(x), loaded(x))
        with pytest.raises(CheckpointError, match=r"backbone= takes a fresh instance .* already wrapped"):
            SupermaskModel.load(tmp_path / init, backbone=model.backbone)
    again = SupermaskModel.load(tmp_path / "signed_constant", backbone=backbone(1))  # rebuilt from the seed
    assert again.frozen_weights_digest() == SupermaskModel(backbone(5), num_tasks=2).frozen_weights_digest()
    with pytest.raises(CheckpointError, match=r"frozen weights differ from the saved model's \(another torch version's "
                                              r"initialisation, or another backbone module\)"):
        SupermaskModel.load(tmp_path / "keep", backbone=backbone(1))
    with pytest.raises(TypeError, match="already wrapped .* pass a fresh instance"):
        SupermaskModel(model.backbone, num_tasks=2)
    with pytest.raises(ValueError, match="unknown weight_init 'signed'.* or 'keep'"):
        SupermaskModel(backbone(0), num_tasks=2, weight_init="signed")


def test_a_user_module_gets_the_paper_init_and_loses_its_biases_with_a_warning():
    """torch's default init and frozen biases are what a user's module brings; the paper's init
    replaces them (seeded), with one warning naming weight_init='keep'."""
    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))

    with pytest.warns(UserWarning, match="biases are set to 0 .* weight_init='keep'"):
        model = SupermaskModel(mlp(), num_tasks=1, seed=3)
    std = [math.sqrt(2 / 64), math.sqrt(2 / 32)]
    for layer, s in zip(model.masked_layers, std):
        assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, s))  # signed constants
        assert not layer.base_layer.bias.any()
    kept_module = mlp()
    kept = SupermaskModel(kept_module, num_tasks=1, weight_init="keep")
    assert kept.masked_layers[0].base_layer.bias.abs().sum() > 0  # its own (frozen) biases
    assert SupermaskModel(mlp(), num_tasks=1, seed=3).frozen_weights_digest() == model.frozen_weights_digest()


def test_infer_task_finds_the_task_of_a_batch(trained):
    """(With the default objective, G, on real MNIST: tests/test_inference.py.)"""
    for task in range(2):
        x, _ = next(iter(_loader(task, seed=2)))
        assert infer_task(trained, x, objective="entropy") == task
        assert infer_task(trained, x, method="binary", objective="entropy") == task
        assert infer_task(trained, x, objective="entropy", num_images=4) == task
        assert infer_task(trained, x, objective="entropy", refine="exact", refine_temperature=2.0) == task
    no_spare = _model(num_outputs=4)
    train_task(no_spare, _loader(0), max_steps=1)
    train_task(no_spare, _loader(1), max_steps=1)
    assert supsup.inference.default_objective(no_spare) == "entropy"  # G needs superfluous outputs
    assert infer_task(no_spare, x) in (0, 1)


def test_files_follow_the_umask(tmp_path):
    """Atomic writes used to create every file 0600; they now get 0666 & ~umask."""
    from supsup.fileio import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_readme_python_api_runs_as_written(tmp_path, mnist_data):
    """The README's ``## Python API`` block, exactly as written, in a fresh interpreter: it finds
    the task and classifies well (its time is measured in ``benchmarks/``, not asserted here)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    (tmp_path / "example.py").write_text(code)
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = re.search(r"inferred task (\d+), accuracy ([0-9.]+)", r.stdout)
    assert m and int(m.group(1)) == 1 and float(m.group(2)) > 0.9, r.stdout
    assert (tmp_path / "permuted.supsup").is_file()


def test_task_classes_restrict_predictions_and_are_saved(tmp_path):
    """Class-incremental: a task answers among its own classes, in predict and after a reload."""
    model = _model(num_outputs=40, num_classes=4)
    train_task(model, _loader(0), max_steps=2)
    model.set_task_classes(0, [2, 3])
    x = torch.randn(64, 64)
    with model.use_task(0):
        preds = model.predict(x)
        logits = model.class_logits(x)
    assert set(preds.tolist()) <= {2, 3} and torch.isinf(logits[:, :2]).all()
    model.save(tmp_path / "m")
    loaded = SupermaskModel.load(tmp_path / "m")
    assert loaded.task_classes == {0: [2, 3]}
    with loaded.use_task(0):
        assert torch.equal(loaded.predict(x), preds)
    with pytest.raises(ValueError, match="task classes"):
        model.set_task_classes(0, [4])


def test_model_files_keep_every_part_of_the_recipe(tmp_path):
    """Another weight init, mask kind and density, a seed: the file rebuilds exactly that model
    (a wrong recipe would fail the frozen weights' digest)."""
    model = _model(weight_init="kaiming_normal", mask_kind="topk", density=0.3, seed=7)
    train_task(model, _loader(0), max_steps=2)
    model.save(tmp_path / "m")
    loaded = SupermaskModel.load(tmp_path / "m")
    assert (loaded.mask_kind, loaded.density, loaded.seed, loaded.spec) == ("topk", 0.3, 7, model.spec)
    x = torch.randn(4, 64)
    with model.use_task(0), loaded.use_task(0):
        assert torch.equal(model(x), loaded(x))


def test_unusable_model_files_say_why(tmp_path, trained):
    import json as _json

    from supsup.checkpoint import MODEL_MAGIC, read_checksummed, write_checksummed

    trained.save(tmp_path / "m")
    tensors, meta = read_checksummed(tmp_path / "m", magic=MODEL_MAGIC)
    write_checksummed(tmp_path / "a", tensors, {"format": "other"}, magic=MODEL_MAGIC)
    with pytest.raises(CheckpointError, match="not a supsup model file \\(no model identity\\)"):
        SupermaskModel.load(tmp_path / "a")
    broken = _json.loads(_json.dumps(meta))
    del broken["identity"]["num_tasks"]
    write_checksummed(tmp_path / "b", tensors, broken, magic=MODEL_MAGIC)
    with pytest.raises(CheckpointError, match="unusable model identity \\(KeyError: 'num_tasks'\\)"):
        SupermaskModel.load(tmp_path / "b")
    write_checksummed(tmp_path / "c", {**tensors, "bank.0": tensors["bank.0"][:, :8]}, meta, magic=MODEL_MAGIC)
    with pytest.raises(CheckpointError, match="has an unusable mask bank: bank.0: expected uint8"):
        SupermaskModel.load(tmp_path / "c")
    assert meta["supsup_version"] == supsup.__version__ and meta["format"] == "supsup-model"
    assert {"layer_shapes", "num_masked_weights", "frozen_weights_sha256"} <= set(meta["identity"])


def test_a_model_file_written_by_0_2_0_still_loads(tmp_path):
    """The on-disk format is a promise: ``tests/data/fc_300_300_v0_2_0.supsup`` was written by
    supsup 0.2.0 (``from_name("fc_300_300", num_tasks=3, num_outputs=40, num_classes=4,
    input_shape=(64,), seed=7)``, two tasks banked from their initial scores, ``save``). It
    loads, and answers as the same model rebuilt today (a renamed identity key, bank entry or
    format tag would refuse it)."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "fc_300_300_v0_2_0.supsup"
    loaded = SupermaskModel.load(path)
    fresh = SupermaskModel.from_name("fc_300_300", num_tasks=3, num_outputs=40, num_classes=4,
                                     input_shape=(64,), seed=7)
    for _ in range(2):
        fresh.add_task()
        fresh.finish_task()
    assert loaded.num_banked_tasks == 2 and loaded.num_tasks == 3 and loaded.num_classes == 4
    assert loaded.identity() == fresh.identity()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for task in range(2):
        with loaded.use_task(task), fresh.use_task(task):
            assert torch.equal(loaded(x), fresh(x))
    with loaded.use_task(0), fresh.use_task(1):
        assert not torch.equal(loaded(x), fresh(x))  # the tasks' masks differ: the check has teeth
    # and a file written today records what that one records, under the same names
    from supsup.checkpoint import MODEL_MAGIC, read_checksummed

    old_tensors, old_meta = read_checksummed(path, magic=MODEL_MAGIC)
    fresh.save(tmp_path / "today.supsup")
    new_tensors, new_meta = read_checksummed(tmp_path / "today.supsup", magic=MODEL_MAGIC)
    assert old_meta["format"] == new_meta["format"] == "supsup-model" and old_meta["supsup_version"] == "0.2.0"
    assert new_meta.keys() == old_meta.keys()
    # keys added since 0.2.0 (what a task banks for likelihood inference; how the frozen weights
    # were initialised), none renamed or dropped
    assert set(new_meta["identity"]) - set(old_meta["identity"]) == {"likelihood", "weight_init"}
    assert {k: new_meta["identity"][k] for k in old_meta["identity"]} == old_meta["identity"]
    assert new_tensors.keys() == old_tensors.keys()
    assert all(torch.equal(new_tensors[k], old_tensors[k]) for k in old_tensors)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_layer_lr_scales_each_layers_first_step(optimizer):
    """``train.layer_lr``: masked layer l learns at lr * layer_lr[l]. RMSprop's and Adam's first
    step move each score by about lr times the sign of its gradient, so the per-layer distances
    moved scale with the multipliers."""
    from supsup.training import make_optimizer

    def first_step(layer_lr):
        model = _model()
        model.add_task()
        start = [p.detach().clone() for p in model.trainable_parameters()]
        opt = make_optimizer(model.trainable_parameters(), TrainConfig(lr=1e-3, optimizer=optimizer,
                                                                       layer_lr=layer_lr))
        x, y = next(iter(_loader(0)))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return [(p.detach() - s).abs().sum().item() for p, s in zip(model.trainable_parameters(), start)]

    plain, scaled = first_step(None), first_step([0.5, 1.0, 2.0])
    assert all(d > 0 for d in plain)
    for d, s, m in zip(plain, scaled, [0.5, 1.0, 2.0]):
        assert s == pytest.approx(m * d, rel=1e-4)


def test_layer_lr_is_checked_against_the_backbone_and_the_backend():
    from supsup.config import ConfigError, load_config
    from supsup.experiment import build_model

    cfg = load_config("configs/permuted_mnist_gn.yaml", ["train.layer_lr=[0.1, 1]"])
    with pytest.raises(ConfigError, match=r"train.layer_lr: has 2 multipliers, but fc1024 has 3 masked layers"):
        build_model(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.layer_lr\[0\]: must be > 0"):
        load_config("configs/permuted_mnist_gn.yaml", ["train.layer_lr=[0, 1, 1]"])
    from supsup.experiment import check_config

    cfg = load_config("configs/permuted_mnist_gn.yaml", ["train.layer_lr=[1, 1, 1]", "backend=avalanche",
                                                         "benchmark.permutation_source=avalanche"])
    with pytest.raises(ConfigError, match="train.layer_lr: is not supported by backend avalanche"):
        check_config(cfg)


def test_a_mask_kind_at_a_rate_that_cannot_train_it_is_warned_about(tmp_path, mnist_data):
    """Bernoulli masks at the paper's lr 1e-4 stay coin flips (measured 0.19): one warning that
    names the keys and the rate to use; none at a measured rate, none for threshold masks."""
    from supsup.config import TrainConfig

    for kind, lr, warned in (("bernoulli", 1e-4, True), ("bernoulli", 0.3, False), ("threshold", 1e-4, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_task(_model(mask_kind=kind), _loader(0, n=64), TrainConfig(lr=lr))
        mine = [str(w.message) for w in caught if "train.lr" in str(w.message)]
        assert len(mine) == int(warned), (kind, lr, mine)
        if warned:
            assert "mask.kind=bernoulli at train.lr=0.0001" in mine[0] and "set train.lr=0.3" in mine[0]
    r = subprocess.run([sys.executable, "-m", "supsup", "run", "demo", "--out", str(tmp_path / "run"), "--set",
                        "mask.kind=bernoulli", "--set", "train.lr=1e-4", "--set", "benchmark.num_tasks=1", "--set",
                        "train.iterations=2", "--set", "eval.max_batches=1", "--set", "progress=false"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "train.lr" in line]  # the CLI: one line, no source line
    assert lines == [lines[0]] and lines[0].startswith("supsup: warning: mask.kind=bernoulli at train.lr=0.0001")
