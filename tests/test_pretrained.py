"""Model files as safetensors + JSON (``save_pretrained`` / ``from_pretrained``, ``supsup export``)."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from supsup import SupermaskModel, TrainConfig, infer_task, train_task
from supsup.checkpoint import CheckpointError
from supsup.config import load_config
from supsup.experiment import build_stream, run_experiment
from supsup.modelfile import PRETRAINED_CONFIG_NAME, SAFETENSORS_NAME

ROOT = Path(__file__).resolve().parent.parent


def _loader(task: int, n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(task)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 64, generator=g)
    x[torch.arange(n), 8 * y + task] += 3.0
    return DataLoader(TensorDataset(x, y), batch_size=32)


@pytest.fixture(scope="module")
def trained() -> SupermaskModel:
    model = SupermaskModel.from_name("fc_300_300", num_tasks=3, num_outputs=40, num_classes=4, input_shape=(64,))
    for task in range(2):
        train_task(model, _loader(task), TrainConfig(lr=1e-2), epochs=2)
    return model


def read_safetensors_header(path: Path) -> dict:
    """The format by hand: 8 bytes little-endian header length, a JSON header, raw tensor bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert 8 + n + end == len(raw)  # nothing else in the file
    return header


def test_save_pretrained_round_trip_is_bitwise_and_never_unpickles(trained, tmp_path, monkeypatch):
    out = trained.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([PRETRAINED_CONFIG_NAME, SAFETENSORS_NAME])
    header = read_safetensors_header(out / SAFETENSORS_NAME)
    assert header["__metadata__"]["format"] == "supsup-model"
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"U8", "F16", "F32", "I64", "F64"}
    config = json.loads((out / PRETRAINED_CONFIG_NAME).read_text())
    assert config["identity"]["spec"]["backbone"] == "fc_300_300" and config["num_banked_tasks"] == 2

    def no_pickle(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled something")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = SupermaskModel.from_pretrained(out)
    monkeypatch.undo()
    assert loaded.bank_sha256() == trained.bank_sha256() and loaded.num_banked_tasks == 2
    x = torch.randn(16, 64)
    for task in range(2):
        with trained.use_task(task), loaded.use_task(task):
            assert torch.equal(trained(x), loaded(x))
    assert infer_task(loaded, x[:8], objective="entropy") == infer_task(trained, x[:8], objective="entropy")


def test_from_pretrained_refuses_damaged_or_missing_files(trained, tmp_path):
    out = trained.save_pretrained(tmp_path / "model")
    tensors = out / SAFETENSORS_NAME
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its config's SHA-256"):
        SupermaskModel.from_pretrained(out)
    tensors.unlink()
    with pytest.raises(CheckpointError, match="supermasks.safetensors is missing"):
        SupermaskModel.from_pretrained(out)
    out = trained.save_pretrained(tmp_path / "again")
    (out / PRETRAINED_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a supsup model config"):
        SupermaskModel.from_pretrained(out)
    with pytest.raises(CheckpointError, match="supsup_config.json is missing"):
        SupermaskModel.from_pretrained(tmp_path / "nothing")


def test_a_model_in_training_is_not_saved(tmp_path):
    model = SupermaskModel.from_name("fc_300_300", num_tasks=2, num_outputs=4, num_classes=4, input_shape=(64,))
    model.add_task()
    with pytest.raises(Exception, match="still being trained"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / PRETRAINED_CONFIG_NAME).exists()


def test_exported_run_gives_the_runs_accuracies(tmp_path, mnist_data):
    """A real run, exported by the CLI: the model read back answers every test image as the run
    did (its GG accuracies, bitwise) and carries the run's bank digest."""
    from supsup.evaluation import evaluate_given_task

    cfg = load_config(ROOT / "configs" / "permuted_mnist_gg.yaml",
                      ["benchmark.num_tasks=2", "train.iterations=10", "progress=false", "eval.max_batches=4",
                       "model.backbone=fc_300_300"])
    results = run_experiment(cfg, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "supsup", "export", str(tmp_path / "run"), str(tmp_path / "model")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 tasks" in proc.stdout
    model = SupermaskModel.from_pretrained(tmp_path / "model")
    assert model.bank_sha256() == results.bank_sha256
    from supsup.experiment.saved import saved_model

    own = saved_model(tmp_path / "run")  # the run's own model, from its checkpoint
    x = torch.randn(8, 1, 28, 28)
    for task in range(2):
        with own.use_task(task), model.use_task(task):
            assert torch.equal(own(x), model(x))
    stream = build_stream(cfg, torch.device("cpu"), progress=False)
    for row in results.tasks:
        acc, _ = evaluate_given_task(model, stream.test_batches(row.task_id, cfg.eval.batch_size, cfg.eval.max_batches),
                                     row.task_id)
        assert acc == row.acc_given_task
    proc = subprocess.run([sys.executable, "-m", "supsup", "export", str(tmp_path / "nothing"), str(tmp_path / "m2")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
