"""End to end on real MNIST through the CLI and the runner (small, fast settings)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from supsup.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from supsup.cli import main
from supsup.config import load_config
from supsup.experiment import evaluate_saved
from supsup.experiment import run_experiment as _run_experiment

SMALL = ["model.backbone=lenet_300_100", "model.num_outputs=100", "train.iterations=150",
         "train.lr=1e-3", "train.batch_size=64", "eval.max_batches=4", "progress=false"]


def run_experiment(cfg, out, **kw) -> dict:
    """The run, as results.json holds it."""
    return _run_experiment(cfg, out, **kw).to_dict()


def _cfg(*extra, config="configs/permuted_mnist_gn.yaml"):
    return load_config(config, [*SMALL, *extra])


def _bank(out: Path) -> dict[str, torch.Tensor]:
    """The masks and the likelihood statistics of a run's checkpoint."""
    tensors, _ = load_checkpoint(out)
    return {k: v for k, v in tensors.items() if k.startswith(("bank.", "likelihood."))}


def _same_results(a: dict, b: dict) -> bool:
    keys = ("acc_given_task", "acc_inferred", "task_inference_acc")
    return [[r[k] for k in keys] for r in a["tasks"]] == [[r[k] for k in keys] for r in b["tasks"]]


def test_cli_run_gn_writes_everything_and_infers_tasks(mnist_data, tmp_path, capsys):
    """Run by the name of a shipped config (what a user who installed the package has)."""
    out = tmp_path / "run"
    code = main(["run", "permuted_mnist_gn", *sum([["--set", s] for s in SMALL], []),
                 "--set", "benchmark.num_tasks=3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "acc_given_task" in printed and "mean" in printed
    for name in ("config.yaml", "results.json", "accuracy.png", CHECKPOINT_NAME):
        assert (out / name).is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "GN" and res["benchmark"] == "permuted_mnist" and res["num_tasks"] == 3
    assert [r["task_id"] for r in res["tasks"]] == [0, 1, 2]
    assert res["task_inference_acc"] == 1.0  # a 3-task run infers every batch's task
    assert res["mean_acc_given_task"] > 0.85
    assert abs(res["mean_acc_inferred"] - res["mean_acc_given_task"]) < 1e-9
    # masks (+ word padding), and likelihood statistics at most the masks' bytes again
    assert res["bank_bytes"] <= 2 * 3 * ((res["num_masked_weights"] + 7) // 8 + 3 * 7)
    assert len(res["bank_sha256"]) == 64
    # the resolved config reloads to the same config
    assert load_config(out / "config.yaml") == _cfg("benchmark.num_tasks=3")


def test_cli_lists_the_shipped_configs(capsys, tmp_path):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    shipped = sorted(p.stem for p in Path("configs").glob("*.yaml"))
    assert shipped and [line.split()[0] for line in listed.splitlines()] == shipped
    assert "demo" in listed and "permuted_mnist" in listed
    assert main(["run", "permuted_mnist_gm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'permuted_mnist_gn'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("config, extra", [
    ("configs/rotated_mnist_gg.yaml", ["benchmark.num_tasks=2"]),
    ("configs/split_mnist_gg.yaml", ["benchmark.num_tasks=2", "model.num_outputs=10"]),
])
def test_rotated_and_split_run_in_gg(mnist_data, tmp_path, config, extra):
    res = run_experiment(_cfg(*extra, config=config), tmp_path / "r")
    assert res["scenario"] == "GG" and res["mean_acc_inferred"] is None
    assert res["mean_acc_given_task"] > 0.8


def test_topk_run(mnist_data, tmp_path):
    res = run_experiment(_cfg("scenario=GG", "benchmark.num_tasks=1", "mask.kind=topk", "mask.density=0.3"), tmp_path / "r")
    assert res["mean_acc_given_task"] > 0.8


def test_same_seed_gives_identical_results(mnist_data, tmp_path):
    cfg = _cfg("benchmark.num_tasks=2")
    a = run_experiment(cfg, tmp_path / "a")
    b = run_experiment(cfg, tmp_path / "b")
    assert _same_results(a, b)
    ba, bb = _bank(tmp_path / "a"), _bank(tmp_path / "b")
    assert all(torch.equal(ba[k], bb[k]) for k in ba)


def test_nn_never_exceeds_capacity(mnist_data, tmp_path):
    # capacity 2 for a 3-task stream: the bank must stay at 2 masks and warn once
    from supsup.detection import NNDetector, train_unlabeled
    from supsup.experiment import build_model, build_stream

    cfg = load_config("configs/permuted_mnist_nn.yaml", [*SMALL, "benchmark.num_tasks=3", "model.capacity=2",
                                                         "nn.check_every=50", "nn.min_batches_per_task=50"])
    stream = build_stream(cfg, torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu"))
    assert model.num_tasks == 2
    detector = NNDetector(model, cfg.nn)
    opt = None
    with pytest.warns(RuntimeWarning, match="full"):
        for t in range(3):
            opt, _ = train_unlabeled(detector, stream.train_batches(t, 200, 64), opt, cfg.train, true_task=t,
                                     progress=False)
            assert model.num_learned_tasks <= 2
    assert model.num_learned_tasks == 2


def test_nn_run_detects_tasks(mnist_data, tmp_path):
    cfg = load_config("configs/permuted_mnist_nn.yaml", [*SMALL, "benchmark.num_tasks=3", "train.iterations=300",
                                                         "train.batch_size=128", "nn.check_every=100"])
    res = run_experiment(cfg, tmp_path / "nn")
    assert res["num_detected_tasks"] == 3
    assert res["mask_to_task"] == {"0": 0, "1": 1, "2": 2}
    assert res["mean_acc_inferred"] > 0.8
    assert res["nn_shared_masks"] == {}


def test_nn_run_reports_missed_task_switches(mnist_data, tmp_path, caplog):
    # a threshold no check can pass: one mask trains on both tasks, and the run says so
    cfg = load_config("configs/permuted_mnist_nn.yaml", [*SMALL, "benchmark.num_tasks=2", "train.iterations=100",
                                                         "nn.check_every=50", "nn.threshold=1e-9"])
    with caplog.at_level("WARNING", logger="supsup.runner"):
        res = run_experiment(cfg, tmp_path / "nn")
    assert res["num_detected_tasks"] == 1
    assert res["nn_shared_masks"] == {"0": [0, 1]}
    assert "mask 0 trained on true tasks 0, 1" in caplog.text


# ------------------------------------------------------------------ crash safety and resume

def _cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "supsup", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _sets(items):
    return sum([["--set", s] for s in items], [])


CRASH = [*SMALL, "benchmark.num_tasks=3", "train.iterations=400"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


def test_sigkill_mid_task_then_resume_is_bitwise_identical(mnist_data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "supsup", "run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / CHECKPOINT_NAME).exists():
        time.sleep(0.05)
    time.sleep(0.3)  # well into task 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, meta = load_checkpoint(out)
    assert meta["loop"]["next_task"] < 3, "the run finished before it could be killed"
    r = _cli(["run", "--resume", str(out)])
    assert r.returncode == 0, r.stderr
    full, resumed = _bank(uninterrupted), _bank(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert _same_results(json.loads((uninterrupted / "results.json").read_text()),
                         json.loads((out / "results.json").read_text()))


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(mnist_data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH), "--out", str(out)],
             env={"SUPSUP_CRASH_AT": "checkpoint_write:2"})
    assert r.returncode == -signal.SIGKILL
    _, meta = load_checkpoint(out)  # the first checkpoint is intact
    assert meta["loop"]["next_task"] == 1
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the torn write was never renamed
    r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH), "--resume", str(out)])
    assert r.returncode == 0, r.stderr
    full, resumed = _bank(uninterrupted), _bank(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def _nn_run_killed_in_its_first_mask_then_resumed(tmp_path, sets: list[str]) -> tuple[Path, Path]:
    """An NN run of ``sets`` uninterrupted (``full``), and one killed at its second checkpoint
    write, while mask 0 is still in training, then resumed (``run``)."""
    full = tmp_path / "full"
    run_experiment(load_config("configs/permuted_mnist_nn.yaml", sets), full)
    out = tmp_path / "run"
    r = _cli(["run", "configs/permuted_mnist_nn.yaml", *_sets(sets), "--out", str(out)],
             env={"SUPSUP_CRASH_AT": "checkpoint_write:2"})
    assert r.returncode == -signal.SIGKILL
    _, meta = load_checkpoint(out)
    assert meta["loop"]["next_task"] == 1 and meta["loop"]["active_task"] == 0  # mask 0 still in training
    r = _cli(["run", "--resume", str(out)])
    assert r.returncode == 0, r.stderr
    return full, out


@pytest.mark.parametrize("method", ["likelihood"])  # the numbering does not depend on the method
def test_nn_sigkill_then_resume_is_bitwise_identical(mnist_data, tmp_path, method):
    """Regression: an NN checkpoint counted the mask in training as learned, so on resume
    add_task() gave it the next id (one past its bank row) and later masks were misnumbered.
    With likelihood statistics, the checkpoint also holds the last images of the mask in
    training, on which its statistics are fitted when it is banked."""
    sets = [*SMALL, "benchmark.num_tasks=3", "train.iterations=300", f"inference.method={method}"]
    full, out = _nn_run_killed_in_its_first_mask_then_resumed(tmp_path, sets)
    a, b = _bank(full), _bank(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("likelihood.") for k in a) == (method == "likelihood")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, out))
    for key in ("num_detected_tasks", "mask_to_task", "nn_counts", "nn_allocations", "mean_acc_inferred"):
        assert ra[key] == rb[key], key
    if method == "likelihood":  # every detected mask banked its statistics, and they find the tasks
        assert ra["num_detected_tasks"] == 3 and ra["task_inference_acc"] > 0.9


def test_calibrate_gives_a_saved_bank_the_statistics_a_likelihood_run_banks(mnist_data, tmp_path, capsys):
    """``supsup calibrate`` replays each task's training order and fits its last images: the same
    statistics as a run that banked them while training, and the same GN results."""
    sets = ["benchmark.num_tasks=2", "inference.num_images=1"]
    run_experiment(_cfg(*sets, "inference.method=likelihood"), tmp_path / "live")
    run_experiment(_cfg(*sets, "inference.method=one_shot"), tmp_path / "later")
    assert not [k for k in _bank(tmp_path / "later") if k.startswith("likelihood.")]
    with pytest.raises(CheckpointError, match="2 of the 2 banked tasks .* have no likelihood statistics"):
        evaluate_saved(tmp_path / "later", overrides=["inference.method=likelihood"])
    assert main(["calibrate", str(tmp_path / "later")]) == 0
    assert "fitted for 2 of 2 tasks" in capsys.readouterr().out
    live, later = _bank(tmp_path / "live"), _bank(tmp_path / "later")
    assert live.keys() == later.keys() and all(torch.equal(live[k], later[k]) for k in live)
    res = [json.loads((tmp_path / "live" / "results.json").read_text()),
           evaluate_saved(tmp_path / "later", overrides=["inference.method=likelihood"]).to_dict()]
    assert _same_results(*res) and res[0]["shortlist_recall"] == 1.0
    assert main(["calibrate", str(tmp_path / "later"), "--set", "train.lr=1"]) == 2  # not a calibration key


class _Crash(Exception):
    pass


@pytest.mark.parametrize("kind", ["threshold", "bernoulli"])
def test_nn_resume_keeps_the_optimizer_state(mnist_data, tmp_path, monkeypatch, kind):
    """An NN checkpoint holds the optimizer state of the mask in training (and, for sampled
    Bernoulli masks, where the samples had got to). With a check interval that does not divide
    the steps per task (40 and 130), the stream resumes between two checks on the same mask,
    so a fresh optimizer (or a restarted sampler) would change every later score."""
    import supsup.fileio

    sets = [*SMALL, "benchmark.num_tasks=2", "train.iterations=130", "nn.check_every=40", f"mask.kind={kind}"]
    cfg = load_config("configs/permuted_mnist_nn.yaml", sets)
    full = run_experiment(cfg, tmp_path / "full")
    calls = []

    def crash_at_second_checkpoint(point):
        calls.append(point)
        if len(calls) == 2:
            raise _Crash

    monkeypatch.setattr(supsup.fileio, "maybe_crash", crash_at_second_checkpoint)
    with pytest.raises(_Crash):
        run_experiment(cfg, tmp_path / "run")
    monkeypatch.undo()
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert meta["loop"]["next_task"] == 1 and meta["loop"]["active_task"] == 0
    assert tensors["optimizer"]["state"], "the checkpoint holds RMSprop's running averages"
    resumed = run_experiment(cfg, tmp_path / "run", resume=True)
    a, b = _bank(tmp_path / "full"), _bank(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["nn_allocations"] == resumed["nn_allocations"] and _same_results(full, resumed)


def test_corrupted_and_truncated_checkpoints_are_refused(uninterrupted, tmp_path):
    import shutil

    for damage in ("flip", "truncate"):
        out = tmp_path / damage
        shutil.copytree(uninterrupted, out)
        path = out / CHECKPOINT_NAME
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0xFF
        else:
            raw = raw[: len(raw) // 3]
        path.write_bytes(bytes(raw))
        # (the directory names hold neither word of the message matched here)
        with pytest.raises(CheckpointError, match="SHA-256 checksum does not match"):
            load_checkpoint(out)
        r = _cli(["run", "--resume", str(out)])
        assert r.returncode == 2 and "Traceback" not in r.stderr and "checksum does not match" in r.stderr


def test_mismatched_checkpoint_is_refused(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(uninterrupted, out)
    r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH), "--set", "model.backbone=fc_300_300",
              "--resume", str(out)])
    assert r.returncode == 2 and "model.backbone" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH), "--set", "seed=1", "--resume", str(out)])
    assert r.returncode == 2 and "seed" in r.stderr


def test_eval_saved_bank(uninterrupted, tmp_path):
    r = _cli(["eval", str(uninterrupted), "--scenario", "GG", "--json", str(tmp_path / "gg.json")])
    assert r.returncode == 0, r.stderr
    gg = json.loads((tmp_path / "gg.json").read_text())
    full = json.loads((uninterrupted / "results.json").read_text())
    assert [t["acc_given_task"] for t in gg["tasks"]] == [t["acc_given_task"] for t in full["tasks"]]
    # GN with the run's own settings: the run's numbers, exactly (the bank is all there is)
    r = _cli(["eval", str(uninterrupted), "--json", str(tmp_path / "gn.json")])
    assert r.returncode == 0, r.stderr
    gn = json.loads((tmp_path / "gn.json").read_text())
    assert [(t["acc_inferred"], t["task_inference_acc"]) for t in gn["tasks"]] == [
        (t["acc_inferred"], t["task_inference_acc"]) for t in full["tasks"]]
    # another objective is another inference, still finding these well-separated permutations
    r = _cli(["eval", str(uninterrupted), "--scenario", "GN", "--set", "inference.objective=entropy",
              "--json", str(tmp_path / "gn_h.json")])
    assert r.returncode == 0, r.stderr
    gn_h = json.loads((tmp_path / "gn_h.json").read_text())
    assert gn_h["eval_overrides"] == ["inference.objective=entropy"] and gn_h["eval_scenario"] == "GN"
    assert gn_h["task_inference_acc"] >= 0.9
    assert all(t["acc_inferred"] <= t["acc_given_task"] for t in gn_h["tasks"])


def test_curve_recomputed_from_the_final_bank_equals_the_curve_measured_in_training(mnist_data, tmp_path):
    """GN masks never change once learned, so the point after n tasks recomputed from the final
    bank's first n masks (supsup eval --curve) equals the one measured while training."""
    from supsup.experiment import evaluate_saved

    cfg = _cfg("benchmark.num_tasks=3", "eval.at_tasks=[1,2,3]", "inference.num_images=4")
    trained = run_experiment(cfg, tmp_path / "run")
    again = evaluate_saved(tmp_path / "run", curve=True).to_dict()
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in trained["curve"]]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in again["curve"]] == strip
    assert again["mean_acc_inferred"] == trained["mean_acc_inferred"]


def test_resuming_a_finished_run_returns_its_results_without_redoing_work(uninterrupted, monkeypatch):
    """A finished run resumed again (e.g. by benchmarks/reproduce.py) returns its results.json
    as it is: no task is retrained, the final evaluation (hours for 2500 tasks) is not re-run
    and the file is not rewritten."""
    import supsup.experiment.native as native

    def boom(*args, **kwargs):
        raise AssertionError("a finished run did work again")

    before = (uninterrupted / "results.json").read_bytes()
    monkeypatch.setattr(native, "learn_task", boom)
    monkeypatch.setattr(native, "final_evaluation", boom)
    results = run_experiment(load_config(uninterrupted / "config.yaml"), uninterrupted, resume=True)
    assert results == json.loads(before)
    assert (uninterrupted / "results.json").read_bytes() == before


def test_resume_accepts_another_group_size(uninterrupted):
    """group_size is speed only (see test_group_size_changes_speed_not_results), so a run
    checkpointed with one may resume with another; the seed, say, may not."""
    before = json.loads((uninterrupted / "results.json").read_text())
    cfg = load_config(uninterrupted / "config.yaml", ["inference.group_size=7"])
    assert run_experiment(cfg, uninterrupted, resume=True) == before
    with pytest.raises(CheckpointError, match="seed"):
        run_experiment(load_config(uninterrupted / "config.yaml", ["seed=1"]), uninterrupted, resume=True)


@pytest.mark.parametrize("damage", ["truncated", "older_than_checkpoint"])
def test_finished_run_with_an_unusable_results_file_is_evaluated_again(uninterrupted, tmp_path, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    if damage == "truncated":
        (out / "results.json").write_text('{"tasks": [')
    else:  # left by an earlier run in the same directory: not this checkpoint's results
        stale = json.loads((out / "results.json").read_text())
        stale["mean_acc_given_task"] = -1.0
        (out / "results.json").write_text(json.dumps(stale))
        t = (out / CHECKPOINT_NAME).stat().st_mtime
        os.utime(out / "results.json", (t - 60, t - 60))
    results = run_experiment(load_config(out / "config.yaml"), out, resume=True)
    original = json.loads((uninterrupted / "results.json").read_text())
    assert _same_results(results, original)
    assert results["mean_acc_given_task"] == original["mean_acc_given_task"]
    assert json.loads((out / "results.json").read_text()) == results


def test_existing_run_is_not_overwritten(uninterrupted):
    before = (uninterrupted / CHECKPOINT_NAME).read_bytes()
    r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH), "--out", str(uninterrupted)])
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (uninterrupted / CHECKPOINT_NAME).read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    (["run", "configs/permuted_mnist_gn.yaml", "--set", "train.iteratons=3"], "did you mean"),
    (["run", "configs/permuted_mnist_gn.yaml", "--set", "model.num_outputs=10"], "inference.objective"),
    (["run", "configs/permuted_mnist_gn.yaml", "--set", "benchmark.num_tasks=-1"], "benchmark.num_tasks"),
    (["run", "no/such/config.yaml"], "cannot read"),
    (["run", "--resume", "no/such/dir"], "no checkpoint"),
])
def test_cli_errors_are_one_line_exit_2(args, fragment, tmp_path):
    r = _cli([*args, "--out", str(tmp_path / "x")] if "--resume" not in args else args)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_user_caused_cli_failures_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Paths, permissions, directories that are not runs, argparse mistakes, missing data: one
    line on stderr, exit 2, no traceback, nothing written."""
    from supsup.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "results.json").write_text("{}")
    monkeypatch.setenv("SUPSUP_MNIST_WHEEL", str(tmp_path / "absent.whl"))
    cases = [
        (["run", "demo", "--out", str(blocker / "run")], "a_file/run: Not a directory"),
        (["report", str(tmp_path)], "has no results.json"),
        (["report", str(not_a_run)], "is not a supsup results file"),
        (["eval", str(tmp_path), "--json", str(tmp_path)], "is a directory"),
        (["eval", str(tmp_path)], "no checkpoint"),
        (["calibrate", str(not_a_run)], "no checkpoint"),
        (["run", "demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["eval"], "required: dir (see `supsup eval --help`)"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["run", "demo", "--threads", "0"], "--threads must be >= 1"),
        (["data", "mnist", "--root", str(tmp_path / "mnist")], "MNIST is not available"),
    ]
    for argv, fragment in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, argv
        assert err and err[-1].startswith("supsup: error: ") and fragment in err[-1], (argv, err)
        assert not any(line.startswith(("Traceback", "usage:")) for line in err), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "not_a_run"]


def test_one_writer_per_run_directory(mnist_data, tmp_path, capsys):
    """While a run writes its directory, a resume, calibrate or report of it stops at once (one
    line, exit 2, nothing written); SIGKILL frees the directory, and the resume then finishes."""
    from supsup.cli import main
    from supsup.experiment.runlock import LOCK_NAME, RunLockedError, run_lock

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "supsup", "run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / CHECKPOINT_NAME).exists():
            time.sleep(0.05)
        for argv in (["run", "--resume", str(out)], ["calibrate", str(out)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "being written by another process (pid" in err[0] and "supsup run" in err[0], err
        with pytest.raises(RunLockedError):
            with run_lock(out, "a test"):
                pass
        assert proc.poll() is None, "the run ended before the second writers were tried"
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs in the killed process
        proc.wait()
    with run_lock(out, "a test"):  # the OS released it with the process
        pass
    assert (out / LOCK_NAME).exists() and (out / CHECKPOINT_NAME).read_bytes() != b""
    assert main(["run", "--resume", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["num_tasks"] == 3
    capsys.readouterr()
    with run_lock(out, "another writer"):  # flock: a second descriptor conflicts, in this process too
        assert main(["report", str(out)]) == 2
        assert "(pid " in capsys.readouterr().err
    assert not (out / "report.md").exists()  # the refused report wrote nothing


def test_precision_auto_times_both_and_records_its_choice(mnist_data, tmp_path):
    """train.precision: auto: a few timed steps of a throwaway copy pick fp32 or bf16 (bf16 only
    if clearly faster), recorded in results.json; a resumed run keeps the recorded choice."""
    from supsup import SupermaskModel
    from supsup.experiment import build_model
    from supsup.experiment.runstate import restore_checkpoint
    from supsup.training import choose_precision

    model = SupermaskModel.from_name("lenet_300_100", num_tasks=1, num_outputs=10)
    model.add_task()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    assert choose_precision(model, x, y, steps=1, margin=0.0)[0] == "fp32"  # bf16 never faster than 0 x fp32
    chosen, ms = choose_precision(model, x, y, steps=1, margin=1e9)
    assert chosen == "bf16" and set(ms) == {"fp32", "bf16"} and all(v > 0 for v in ms.values())
    out = tmp_path / "run"
    cfg = load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "benchmark.num_tasks=2", "train.iterations=20",
                                                         "train.precision=auto"])
    first = run_experiment(cfg, out)
    assert first["precision"] in ("fp32", "bf16") and set(first["precision_step_ms"]) == {"fp32", "bf16"}
    again = restore_checkpoint(out, cfg, build_model(cfg, torch.device("cpu"))).results
    assert again.precision == first["precision"]


def test_sigkill_inside_a_task_then_resume_is_bitwise_identical(mnist_data, uninterrupted, tmp_path):
    """train.checkpoint_every: a kill between two steps of a task resumes at the last such
    checkpoint (scores, optimizer, data order, losses, calibration images), to the bank,
    accuracies and loss curve of the run that was never stopped, nor checkpointed inside tasks."""
    import csv

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "supsup", "run", "configs/permuted_mnist_gn.yaml", *_sets(CRASH),
                             "--set", "train.checkpoint_every=60", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, meta = time.time() + 300, {}
        while time.time() < deadline:
            if (out / CHECKPOINT_NAME).exists():
                try:
                    _, meta = load_checkpoint(out)
                except CheckpointError:  # being replaced: read the next one
                    continue
                if meta["loop"].get("active_task") == 1:  # inside task 1, after task 0 was banked
                    break
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.3))  # then at a random step (the kill lands between checkpoints)
    finally:
        proc.kill()
        proc.wait()
    tensors, meta = load_checkpoint(out)
    assert meta["loop"]["next_task"] < 3, "the run finished before it could be killed"
    if meta["loop"].get("active_task") is not None:  # the last checkpoint was taken inside a task
        assert int(tensors["progress.step"]) % 60 == 0
    r = _cli(["run", "--resume", str(out)])
    assert r.returncode == 0, r.stderr
    full, resumed = _bank(uninterrupted), _bank(out)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    a = json.loads((uninterrupted / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert _same_results(a, b) and a["bank_sha256"] == b["bank_sha256"]

    def losses(run):
        with open(run / "metrics.csv") as f:
            return [row["loss"] for row in csv.DictReader(f)]
    assert losses(uninterrupted) == losses(out) and len(losses(out)) == 3


def test_resume_inside_a_task_with_batchnorm_and_bernoulli_masks_is_bitwise_identical(mnist_data, tmp_path):
    """What else a task's training carries: per-task BatchNorm running statistics and the
    Bernoulli sampler's state; killed right after a checkpoint inside task 1, the resumed run
    ends with the bank and accuracies of the run that was never stopped."""
    sets = ["model.backbone=conv4_bn", "model.num_outputs=10", "inference.objective=entropy",
            "mask.kind=bernoulli", "train.lr=0.3", "train.iterations=24", "train.batch_size=16",
            "train.checkpoint_every=8", "benchmark.num_tasks=2", "eval.max_batches=1", "eval.batch_size=64",
            "progress=false", "inference.method=likelihood", "inference.likelihood_images=32"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for out, env in ((full, None), (cut, {"SUPSUP_CRASH_AT": "inside_task_checkpoint:3"})):
        r = _cli(["run", "configs/permuted_mnist_gn.yaml", *_sets(sets), "--out", str(out)], env=env)
        assert r.returncode == (0 if env is None else -signal.SIGKILL), r.stderr
    tensors, meta = load_checkpoint(cut)
    assert meta["loop"] == {"next_task": 1, "active_task": 1} and int(tensors["progress.step"]) == 8
    assert len([k for k in tensors if k.startswith("running.")]) == 4 and "sampler" in tensors
    r = _cli(["run", "--resume", str(cut)])
    assert r.returncode == 0, r.stderr
    a, b = _bank(full), _bank(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert ra["bank_sha256"] == rb["bank_sha256"] and _same_results(ra, rb)


def test_checkpoints_inside_a_task_are_refused_where_they_are_not_taken():
    from supsup.config import ConfigError
    from supsup.experiment import check_config

    for extra in (["scenario=NN"], ["backend=avalanche", "benchmark.permutation_source=avalanche"]):
        cfg = load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "train.checkpoint_every=10", *extra])
        with pytest.raises(ConfigError, match="train.checkpoint_every"):
            check_config(cfg)
    check_config(load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "train.checkpoint_every=10"]))
    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        load_config("configs/permuted_mnist_gn.yaml", ["train.checkpoint_every=0"])


def test_an_explicit_bf16_that_is_slower_warns_with_both_step_times(mnist_data, tmp_path, monkeypatch):
    import supsup.experiment.native as native

    monkeypatch.setattr(native, "choose_precision", lambda model, x, y: ("fp32", {"fp32": 10.0, "bf16": 31.0}))
    cfg = load_config("configs/permuted_mnist_gn.yaml", [*SMALL, "benchmark.num_tasks=1", "train.iterations=5",
                                                         "train.precision=bf16"])
    with pytest.warns(UserWarning, match=r"bf16 is slower than fp32 .* 31\.0 ms against 10\.0 ms"):
        res = run_experiment(cfg, tmp_path / "run")
    assert res["precision"] == "bf16" and res["precision_step_ms"] == {"fp32": 10.0, "bf16": 31.0}


def test_nn_resume_on_a_batchnorm_backbone_is_bitwise_identical(mnist_data, tmp_path):
    """The mask in training at an NN checkpoint goes on with its own BatchNorm running statistics
    (add_task starts them afresh: the checkpoint's must be put back after it)."""
    sets = [*SMALL, "model.backbone=conv4_bn", "benchmark.num_tasks=2", "train.iterations=24",
            "train.batch_size=16", "inference.method=likelihood", "inference.likelihood_images=32",
            "eval.max_batches=1", "eval.batch_size=64"]
    full, out = _nn_run_killed_in_its_first_mask_then_resumed(tmp_path, sets)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, out))
    assert ra["bank_sha256"] == rb["bank_sha256"]  # masks, BatchNorm statistics, likelihood statistics
