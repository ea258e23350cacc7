"""``supsup tune``: search spaces, pruning, validation data, a killed tune, a shared study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from supsup.config import ConfigError, load_config
from supsup.experiment.tune import load_space, trial_config, tune

ROOT = Path(__file__).resolve().parent.parent
#: 3 PermutedMNIST tasks, each a few steps of a small MLP, scored on 300 held-out images
SMALL = ["benchmark.num_tasks=3", "train.iterations=8", "model.backbone=fc_300_300", "eval.max_batches=3",
         "eval.batch_size=100"]


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def base():
    return load_config(ROOT / "configs" / "permuted_mnist_gn.yaml", SMALL)


@pytest.mark.parametrize("text, message", [
    ("train.lrr: {low: 0.1, high: 0.2}", "space train.lrr: train.lrr: unknown key"),
    ("train.lr: {low: 0.2, high: 0.1}", "space train.lr: low (0.2) must be below high (0.1)"),
    ("train.lr: {low: 0, high: 0.1, log: true}", "space train.lr: a log scale needs low > 0"),
    ("train.lr: {low: 0.1, high: 0.2, scale: log}", "space train.lr: unknown field 'scale'"),
    ("train.lr: {low: -1.0, high: 0.1}", "space train.lr: train.lr: must be > 0.0"),
    ("train.schedule: {choices: [constant, cosin]}", "space train.schedule: train.schedule: unknown value 'cosin'"),
    ("train.lr: 0.1", "space train.lr: needs {low"),
    ("[1, 2]", "a search space maps config keys to ranges"),
])
def test_a_bad_space_is_a_one_line_error(tmp_path, base, text, message):
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path / "space.yaml", text), base)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_validation_images_come_from_the_training_data_and_leave_it(mnist_data):
    import torch

    from supsup.experiment import build_stream

    cfg = load_config(ROOT / "configs" / "permuted_mnist_gn.yaml", ["benchmark.num_tasks=2", "benchmark.validation=500"])
    held = build_stream(cfg, torch.device("cpu"), progress=False)
    plain = build_stream(load_config(ROOT / "configs" / "permuted_mnist_gn.yaml", ["benchmark.num_tasks=2"]),
                         torch.device("cpu"), progress=False)
    n = plain.num_samples(1, "train")
    assert held.num_samples(1, "test") == 500 and held.num_samples(1, "train") == n - 500

    def rows(stream, split, count):
        x, _ = stream.batch(1, split, torch.arange(count))
        return {bytes(r.numpy()) for r in x.flatten(1)}

    validation = rows(held, "test", 500)
    assert len(validation) == 500
    assert validation <= rows(plain, "train", n)  # training images
    assert not validation & rows(held, "train", n - 500)  # no longer trained on
    assert not validation & rows(plain, "test", plain.num_samples(1, "test"))  # the test set is not read


def test_trials_train_and_score_on_held_out_training_images(base):
    cfg = trial_config(base, {"train.lr": 0.01}, 300)
    assert cfg.train.lr == 0.01 and cfg.benchmark.validation == 300 and cfg.eval.at_tasks == [1, 2, 3]


def test_tune_prunes_and_writes_the_best_config(tmp_path, base, mnist_data):
    space = load_space(write_space(tmp_path / "space.yaml", "train.lr: {low: 1.0e-6, high: 1.0e-1, log: true}\n"
                                                            "train.schedule: {choices: [constant, cosine]}\n"), base)
    summary = tune(base, space, tmp_path / "out", trials=8, validation=300)
    states = [t["state"] for t in summary["trials"]]
    assert len(states) == 8 and "PRUNED" in states and "COMPLETE" in states
    for t in summary["trials"]:
        assert list(t["reported"])[0] == "1"  # every trial reported after its first task
        if t["state"] == "PRUNED":
            assert len(t["reported"]) < 3  # stopped before the last task
            assert not (Path(t["run_dir"]) / "results.json").exists()
        else:
            assert t["value"] == t["reported"]["3"]
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in summary["trials"] if t["state"] == "COMPLETE")
    cfg = load_config(tmp_path / "out" / "best.yaml")  # supsup run takes it: the test set again
    assert cfg.train.lr == best["params"]["train.lr"] and cfg.benchmark.validation is None
    # the trial's run directory records what it was scored on
    run = load_config(Path(summary["trials"][best["number"]]["run_dir"]) / "config.yaml")
    assert run.benchmark.validation == 300


def _tune_cmd(out: Path, space: Path, trials: int) -> list[str]:
    cmd = [sys.executable, "-m", "supsup", "tune", str(ROOT / "configs" / "permuted_mnist_gn.yaml"), "--space",
           str(space), "--trials", str(trials), "--out", str(out), "--validation", "300", "--threads", "1"]
    for s in SMALL:
        cmd += ["--set", s]
    return cmd


def _trials(out: Path) -> list:
    study = optuna.load_study(study_name="supsup", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials()


def test_a_killed_tune_resumes_its_trial_from_the_checkpoint(tmp_path, mnist_data):
    space = write_space(tmp_path / "space.yaml", "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    out = tmp_path / "out"
    # killed in the middle of writing the second trial's second checkpoint (the 5th)
    env = dict(os.environ, SUPSUP_CRASH_AT="checkpoint_write:5")
    proc = subprocess.run(_tune_cmd(out, space, 3), env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (running,) = [t for t in _trials(out) if t.state == optuna.trial.TrialState.RUNNING]
    env.pop("SUPSUP_CRASH_AT")
    proc = subprocess.run(_tune_cmd(out, space, 3), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = _trials(out)
    (failed,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.number == running.number
    (again,) = [t for t in trials if t.user_attrs.get("resume_dir") == running.user_attrs["run_dir"]]
    assert again.params == running.params and again.state == optuna.trial.TrialState.COMPLETE
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    summary = json.loads((out / "study.json").read_text())
    assert summary["best"] is not None and yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"] > 0


def test_two_processes_share_one_study_without_running_a_trial_twice(tmp_path, mnist_data):
    space = write_space(tmp_path / "space.yaml", "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ)
    cmds = [_tune_cmd(out, space, 4) + ["--pruner", "none"] for _ in range(2)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    trials = _trials(out)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 4
    assert len({t.number for t in trials}) == len(trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == len(run_dirs)  # no trial ran twice
    assert len({t.user_attrs["pid"] for t in done}) == 2  # both processes ran trials
