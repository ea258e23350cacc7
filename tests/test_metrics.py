"""Continual-learning metrics, run logs and the run report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from supsup.config import ConfigError, load_config
from supsup.experiment import run_experiment
from supsup.experiment.runreport import write_run_report
from supsup.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.backbone=lenet_300_100", "model.num_outputs=100", "train.iterations=60", "train.lr=1e-3",
         "train.batch_size=64", "eval.max_batches=3", "progress=false", "benchmark.num_tasks=3"]


def test_metrics_of_a_known_matrix():
    """Three tasks; R[i][j] after learning task i. Hand-computed: ACC = (0.5+0.6+0.9)/3,
    BWT = ((0.5-0.9) + (0.6-0.8)) / 2, forgetting = ((0.9-0.5) + (0.8-0.6)) / 2 (task 0's best
    earlier accuracy is 0.9), FWT = ((0.3-0.1) + (0.4-0.2)) / 2."""
    rows = [[0.9, 0.3, 0.1], [0.7, 0.8, 0.4], [0.5, 0.6, 0.9]]
    learned = [1, 2, 3]
    assert average_accuracy(rows, learned) == pytest.approx(2.0 / 3)
    assert backward_transfer(rows, learned) == pytest.approx(-0.3)
    assert forgetting(rows, learned) == pytest.approx(0.3)
    assert forward_transfer(rows, learned, [0.1, 0.1, 0.2]) == pytest.approx(0.2)
    assert forward_transfer(rows, learned, None) is None
    # rows only at some points: each metric uses what it has
    sparse = [[0.9, None, None], [0.5, 0.6, 0.9]]
    assert backward_transfer(sparse, [1, 3]) == pytest.approx(-0.4)  # task 1's just-learned row is missing
    assert forgetting(sparse, [1, 3]) == pytest.approx(0.4)
    assert forgetting(sparse[-1:], [3]) is None and backward_transfer([], []) is None


@pytest.fixture(scope="module")
def gn_run(tmp_path_factory, mnist_data):
    out = tmp_path_factory.mktemp("gn") / "run"
    cfg = load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "eval.at_tasks=[1, 2, 3]", "model.norm=per_task"])
    return out, run_experiment(cfg, out).to_dict()


def test_a_three_task_run_has_the_matrix_and_its_metrics(gn_run):
    out, res = gn_run
    m = res["accuracy_matrix"]
    assert m["num_tasks_learned"] == [1, 2, 3]
    for kind in ("given", "inferred"):
        rows = m[kind]
        assert len(rows) == 3 and all(len(r) == 3 for r in rows)
        assert all(rows[i][j] is None for i in range(3) for j in range(i + 1, 3))  # not learned yet: no mask
    given = m["given"]
    for j in range(3):  # a banked mask never changes: constant down each column
        assert len({given[i][j] for i in range(j, 3)}) == 1
    assert res["bwt"]["given"] == 0.0 and res["forgetting"]["given"] == 0.0
    assert res["average_accuracy"]["given"] == pytest.approx(res["mean_acc_given_task"])
    assert res["average_accuracy"]["inferred"] == pytest.approx(res["mean_acc_inferred"])
    assert res["fwt"] == {"given": None, "inferred": None}
    assert set(res["task_confusion"]) == {"0", "1", "2"}
    assert (out / "confusion.png").is_file()
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["task"]) for r in rows] == [0, 1, 2]
    assert all(float(r["loss"]) > 0 and float(r["train_seconds"]) > 0 for r in rows)
    assert float(rows[2]["mean_acc_inferred"]) == pytest.approx(res["mean_acc_inferred"])


def test_report_for_a_run_with_its_bank(gn_run):
    out, _ = gn_run
    path = write_run_report(out)
    text = path.read_text()
    for fig in ("report_matrix_given.png", "report_matrix_inferred.png", "report_curve.png", "report_confusion.png",
                "report_overlap.png", "report_density.png"):
        assert f"]({fig})" in text and (out / fig).stat().st_size > 1000, fig
    assert "backward transfer (BWT) | 0.0000" in text and "| layer 0 (300x784) |" in text


def test_report_for_a_committed_long_run_without_its_bank(tmp_path):
    """The committed 2500-task NN run: results.json only, written before the matrix existed."""
    src = ROOT / "benchmarks" / "results" / "reproduce" / "lenet_2500_nn"
    shutil.copy2(src / "results.json", tmp_path / "results.json")
    assert "accuracy_matrix" not in json.loads((tmp_path / "results.json").read_text())
    text = write_run_report(tmp_path).read_text()
    assert "2500 tasks" in text and "the mask overlap and density figures need the bank" in text
    assert (tmp_path / "report_matrix_inferred.png").is_file() and (tmp_path / "report_curve.png").is_file()


def test_report_refuses_a_directory_without_results(tmp_path):
    from supsup.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no results.json"):
        write_run_report(tmp_path)


def test_tensorboard_logs_and_bad_backends(tmp_path, mnist_data):
    cfg = load_config("configs/permuted_mnist_gg.yaml", [*SMALL, "benchmark.num_tasks=2", "log.backends=[csv, tensorboard]"])
    run_experiment(cfg, tmp_path / "run")
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    with pytest.raises(ConfigError, match="log.backends: unknown value 'neptune'"):
        load_config(None, ["log.backends=[neptune]"])


def test_resumed_run_rewrites_metrics_after_its_checkpoint(tmp_path, mnist_data):
    """A row written after the last checkpoint (the run then stopped) is dropped on resume and
    written again: one row per task."""
    cfg = load_config("configs/permuted_mnist_gg.yaml", [*SMALL, "benchmark.num_tasks=2"])
    run_experiment(cfg, tmp_path / "run")
    path = tmp_path / "run" / "metrics.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, "1,2,9.9,,,,,,"]) + "\n")  # a stray row of a killed run
    (tmp_path / "run" / "results.json").unlink()  # so that resume runs the final evaluation again
    from supsup.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(tmp_path / "run")
    meta["loop"]["next_task"] = 1  # pretend the checkpoint was taken after task 0
    meta["results"]["tasks"] = meta["results"]["tasks"][:1]
    meta["results"]["curve"] = meta["results"].get("curve", [])[:1]
    tensors = {k: (v[:1] if k.startswith("bank.") else v) for k, v in tensors.items()}
    save_checkpoint(tmp_path / "run", tensors, meta)
    run_experiment(cfg, tmp_path / "run", resume=True)
    with open(path) as f:
        assert [r["task"] for r in csv.DictReader(f)] == ["0", "1"]


def test_cli_report_command(gn_run, capsys):
    from supsup.cli import main

    out, _ = gn_run
    assert main(["report", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert main(["report", str(out / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_mask_overlap_and_density_are_counted_from_the_packed_bank():
    """Jaccard |A & B| / |A | B| and density on known masks (a 70-weight layer: its packed row
    ends in padding bits that must not count)."""
    import numpy as np
    import torch

    from supsup.experiment.runreport import mask_densities, mask_statistics
    from supsup.masks import pack_bits

    a = torch.zeros(70, dtype=torch.bool)
    a[:35] = True
    b = torch.zeros(70, dtype=torch.bool)
    b[20:55] = True
    c = torch.ones(70, dtype=torch.bool)
    bank = {"bank.0": torch.stack([pack_bits(m) for m in (a, b, c)])}
    jac, dens = mask_statistics(bank, [[7, 10]], [0, 1, 2])
    name = "layer 0 (7x10)"
    np.testing.assert_allclose(dens[name], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(jac[name], [[1, 15 / 55, 0.5], [15 / 55, 1, 0.5], [0.5, 0.5, 1]])
    np.testing.assert_allclose(mask_densities(bank, [[7, 10]], [2, 0])[name], [1.0, 0.5])


def test_results_json_round_trips_its_typed_reports_and_keeps_unknown_keys():
    """What backends add to results.json (precision choice, communication, baselines, HopSupSup)
    are typed fields read back as they were written; keys of a newer version are kept as they are."""
    from supsup.config import Scenario
    from supsup.experiment.results import BaselineReport, HopSupSupReport, RunResults

    r = RunResults(Scenario.GN, "permuted_mnist", 2, "native", "supsup", "fc1024", precision="bf16",
                   precision_step_ms={"fp32": 10.0, "bf16": 7.5}, communication_seconds=0.25,
                   communication_bytes_per_task=39409, data_cache_seconds=1.5,
                   baseline=BaselineReport({"lr": 0.1}, False, "multi", 1234, 100),
                   hopsupsup=HopSupSupReport("storkey", [8, 8], 512, 256.0, 2, 30.0, 1.0, [{"task": 0}], [0.5]),
                   extra={"from_a_newer_version": [1, 2]})
    d = json.loads(json.dumps(r.to_dict()))
    assert d["precision"] == "bf16" and d["baseline_hparams"] == {"lr": 0.1} and d["hopsupsup"]["rule"] == "storkey"
    back = RunResults.from_dict(d)
    for name in ("precision", "precision_step_ms", "communication_seconds", "communication_bytes_per_task",
                 "data_cache_seconds", "baseline", "hopsupsup"):
        assert getattr(back, name) == getattr(r, name), name
    assert back.extra == {"from_a_newer_version": [1, 2]}
    assert back.to_dict() == d
