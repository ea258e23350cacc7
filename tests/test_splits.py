"""Class-split streams from files in the real formats (CIFAR's pickled batches, an ImageFolder
tree), written small and synthetic so that the real loading code runs without the datasets."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from supsup.data import STREAMS, DataUnavailableError, create_stream
from supsup.data.cifar import load_cifar
from supsup.data.splits import class_order


def test_load_cifar_reads_the_real_format(tmp_path, write_cifar100):
    write_cifar100(tmp_path)
    data = load_cifar("cifar100", tmp_path)
    assert data["train_images"].shape == (1000, 3, 32, 32) and data["train_images"].dtype == torch.uint8
    assert data["test_labels"].tolist()[:3] == [0, 1, 2]
    assert torch.equal(data["train_images"][:, 0, 0, 0], (data["train_labels"] * 2).to(torch.uint8))


def test_missing_or_malicious_files_are_clear_errors(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"cifar-100-python lacks train, test; download cifar-100-python"):
        load_cifar("cifar100", tmp_path)
    d = tmp_path / "cifar-100-python"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("train", "test"):
        (d / name).write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataUnavailableError, match="unreadable CIFAR file"):
        load_cifar("cifar100", tmp_path)


@pytest.mark.parametrize("labels", [None, [1.9] * 4, "abcd"], ids=["missing", "float", "text"])
def test_cifar_labels_that_are_not_integers_are_clear_errors(tmp_path, labels):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name in ("train", "test"):
        entry = {"data": np.zeros((4, 3072), dtype=np.uint8)}
        if labels is not None:
            entry["fine_labels"] = labels
        (d / name).write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataUnavailableError, match="'fine_labels' must hold 4 integer labels"):
        load_cifar("cifar100", tmp_path)


def test_cli_without_cifar_exits_2_naming_the_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "supsup", "run", "configs/split_cifar100_gg.yaml", "--set",
                        f"benchmark.data_root={tmp_path}", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "cifar-100-python") in r.stderr and "train, test" in r.stderr


def test_split_cifar100_deals_classes_in_the_papers_order(tmp_path, write_cifar100):
    write_cifar100(tmp_path)
    data = STREAMS.get("split_cifar100").load_data(tmp_path)
    stream = create_stream("split_cifar100", data, num_tasks=20, seed=3)
    order = class_order(3, 100)
    assert order.tolist() == np.random.RandomState(3).permutation(100).tolist()
    for t in (0, 19):
        assert stream.task_classes_of[t] == order[5 * t: 5 * t + 5].tolist()
        x, y = stream.raw_batch(t, "test", torch.arange(stream.num_samples(t, "test")))
        classes = (x[:, 0, 0, 0] // 2).long()  # the class written into the red plane
        assert torch.equal(y, torch.tensor([order[5 * t: 5 * t + 5].tolist().index(c) for c in classes.tolist()]))
        assert set(y.tolist()) == set(range(5))
    assert stream.input_shape == (3, 32, 32) and stream.num_classes == 5


def _write_cifar10(root, per_batch=40, seed=0):
    """cifar-10-batches-py/{data_batch_1..5, test_batch} as torchvision reads them: pickled dicts
    with bytes keys (the original Python 2 pickles, read with encoding latin1), 'labels'."""
    rs = np.random.RandomState(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rs.randint(0, 10, size=per_batch)]
        data = rs.randint(0, 256, size=(per_batch, 3072)).astype(np.uint8)
        data[:, :1024] = np.array(labels, dtype=np.uint8)[:, None] * 20  # the red plane encodes the class
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)


def test_split_cifar10_reads_every_training_batch_and_deals_pairs_of_classes(tmp_path):
    _write_cifar10(tmp_path)
    data = load_cifar("cifar10", tmp_path)
    assert data["train_images"].shape == (200, 3, 32, 32) and data["test_images"].shape == (40, 3, 32, 32)
    assert torch.equal(data["train_images"][:, 0, 0, 0], (data["train_labels"] * 20).to(torch.uint8))
    stream = create_stream("split_cifar10", STREAMS.get("split_cifar10").load_data(tmp_path), num_tasks=5, seed=1)
    order = class_order(1, 10)
    assert sorted(c for t in range(5) for c in stream.task_classes_of[t]) == list(range(10))
    for t in range(5):
        assert stream.task_classes_of[t] == order[2 * t: 2 * t + 2].tolist()
        x, y = stream.raw_batch(t, "train", torch.arange(stream.num_samples(t, "train")))
        classes = (x[:, 0, 0, 0] // 20).long().tolist()
        assert y.tolist() == [order[2 * t: 2 * t + 2].tolist().index(c) for c in classes]
    assert stream.num_classes == 2 and stream.input_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="5 tasks"):
        create_stream("split_cifar10", STREAMS.get("split_cifar10").load_data(tmp_path), num_tasks=6, seed=1)


def test_split_cifar_training_batches_are_augmented_reproducibly(tmp_path, write_cifar100):
    write_cifar100(tmp_path)
    data = STREAMS.get("split_cifar100").load_data(tmp_path)
    a = list(create_stream("split_cifar100", data, num_tasks=2, seed=0).train_batches(1, 3, 8))
    b = list(create_stream("split_cifar100", data, num_tasks=2, seed=0).train_batches(1, 3, 8))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    stream = create_stream("split_cifar100", data, num_tasks=2, seed=0)
    x, _ = stream.raw_batch(1, "train", torch.arange(8))
    aug = stream.augment(x, torch.Generator().manual_seed(0))
    assert aug.shape == x.shape and not torch.equal(aug, x)
    # every augmented image is a shifted (and maybe mirrored) crop of the zero-padded original
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        crops = [padded[i, :, dy: dy + 32, dx: dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(aug[i], c) or torch.equal(aug[i], c.flip(-1)) for c in crops)


def _write_imagefolder(root, classes=20, per_class=3, size=(40, 48)):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(classes):
            d = root / "imagenet" / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                img = torch.full((3, *size), c * 10, dtype=torch.uint8)
                img[1] = i
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")


def test_split_imagenet_reads_an_imagefolder_tree(tmp_path):
    _write_imagefolder(tmp_path)
    data = STREAMS.get("split_imagenet").load_data(tmp_path)
    stream = create_stream("split_imagenet", data, num_tasks=2, seed=1)
    assert stream.max_tasks == 2 and stream.input_shape == (3, 224, 224)
    x, y = next(stream.test_batches(1, 8))
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32
    order = class_order(1, 20)[10:20].tolist()
    raw, y = stream.raw_batch(1, "test", torch.arange(30))
    assert torch.equal(y, torch.tensor([order.index(int(v) // 10) for v in raw[:, 0, 112, 112]]))
    (xb, yb), = list(stream.train_batches(0, 1, 4))
    assert xb.shape == (4, 3, 224, 224)
    with pytest.raises(DataUnavailableError, match="imagenet"):
        STREAMS.get("split_imagenet").load_data(tmp_path / "none")


def test_resnet18_learns_split_cifar_through_the_native_runner(tmp_path, write_cifar100):
    """End to end on the synthetic files: the config's stream and ResNet-18 with per-task
    BatchNorm, far above the 0.2 of chance (the class is in the red plane)."""
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    write_cifar100(tmp_path, n_train=1000, n_test=200)
    cfg = load_config("configs/split_cifar100_gg.yaml", [
        f"benchmark.data_root={tmp_path}", "benchmark.num_tasks=1", "train.iterations=50", "train.batch_size=16",
        "progress=false", "eval.batch_size=10"])
    res = run_experiment(cfg, tmp_path / "run").to_dict()
    assert res["backbone"] == "resnet18" and [r["task_id"] for r in res["tasks"]] == [0]
    assert res["mean_acc_given_task"] > 0.6
