"""Runs logged to Weights & Biases (offline) and MLflow (file store), read back from each."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2

from supsup.config import ConfigError, load_config
from supsup.experiment import run_experiment

ROOT = Path(__file__).resolve().parent.parent


def read_wandb_offline(run_dir: Path) -> dict:
    """An offline W&B run's config, history rows and summary, read from its ``.wandb`` file (a
    LevelDB-style log: a 7-byte file header, 32 KiB blocks of records, each with a 7-byte header:
    CRC, length, type 1 full / 2 first / 3 middle / 4 last; the payload a protobuf Record)."""
    (path,) = run_dir.glob("*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos: pos + 7])
        pos += 7
        if n == 0 and kind == 0:  # padding to the end of the block
            pos += left - 7
            continue
        buf += raw[pos: pos + n]
        pos += n
        if kind in (1, 4):
            records.append(buf)
            buf = b""
    out = {"config": {}, "history": [], "summary": {}}
    for data in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "run":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return out


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def mlflow_run(out: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    return client, run_id, client.get_run(run_id)


def test_native_run_writes_wandb_and_mlflow(tmp_path, offline, mnist_data):
    cfg = load_config(ROOT / "configs" / "permuted_mnist_gn.yaml",
                      ["benchmark.num_tasks=2", "train.iterations=15", "progress=false", "eval.max_batches=2",
                       "model.backbone=fc_300_300", "log.backends=[csv,wandb,mlflow]"])
    out = tmp_path / "run"
    results = run_experiment(cfg, out)
    given = [r.acc_given_task for r in results.tasks]
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header and two tasks

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    wb = read_wandb_offline(run_dir)
    assert wb["config"]["train"]["iterations"] == 15 and wb["config"]["scenario"] == "GN"
    losses = [h["train/loss"] for h in wb["history"] if "train/loss" in h]
    assert len(losses) == 30 and all(v > 0 for v in losses)
    assert [h["task/acc_given_task"] for h in wb["history"] if "task/acc_given_task" in h] == given
    assert wb["summary"]["bank_sha256"] == results.bank_sha256
    assert wb["summary"]["mean_acc_inferred"] == pytest.approx(results.summary.inferred.acc_inferred)
    table = json.loads((run_dir / "files" / wb["summary"]["accuracy_matrix/given/path"]).read_text())
    assert [row[1:] for row in table["data"]] == results.accuracy_matrix.given
    assert wb["summary"]["figures/accuracy/_type"] == "image-file"
    assert (run_dir / "files" / wb["summary"]["figures/accuracy/path"]).stat().st_size > 0

    client, run_id, run = mlflow_run(out)
    assert run.data.params["train.iterations"] == "15" and run.data.tags["bank_sha256"] == results.bank_sha256
    assert len(client.get_metric_history(run_id, "train/loss")) == 30
    assert [m.value for m in sorted(client.get_metric_history(run_id, "task/acc_given_task"), key=lambda m: m.step)] == given
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"accuracy.png", "accuracy_matrix.json", "results.json"} <= names
    assert run.info.status == "FINISHED"


def test_avalanche_run_logs_through_avalanches_wandb_logger(tmp_path, offline, mnist_data):
    cfg = load_config(ROOT / "configs" / "permuted_mnist_gg.yaml",
                      ["benchmark.num_tasks=2", "train.iterations=10", "progress=false", "eval.max_batches=2",
                       "model.backbone=fc_300_300", "backend=avalanche", "benchmark.permutation_source=avalanche", "log.backends=[wandb,mlflow]"])
    out = tmp_path / "run"
    results = run_experiment(cfg, out)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    wb = read_wandb_offline(run_dir)
    assert any(k.startswith("Top1_Acc_Exp") for h in wb["history"] for k in h)  # Avalanche's own metrics
    assert wb["summary"]["bank_sha256"] == results.bank_sha256
    client, run_id, run = mlflow_run(out)
    assert run.data.tags["bank_sha256"] == results.bank_sha256
    assert [m.value for m in sorted(client.get_metric_history(run_id, "task/acc_given_task"), key=lambda m: m.step)] \
        == [r.acc_given_task for r in results.tasks]


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="log.backends: unknown value 'wandbb'"):
        load_config(None, ["log.backends=[wandbb]"])
