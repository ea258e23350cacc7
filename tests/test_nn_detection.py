"""benchmarks/nn_detection.py on a real (tiny) GN run: its columns measure what they claim."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supsup.checkpoint import CHECKPOINT_NAME
from supsup.config import load_config, save_config

ROOT = Path(__file__).resolve().parent.parent
# Three tasks trained long enough for their masks to be told apart, in a stream of five: tasks
# 3 and 4 are unseen, as in a GN run stopped part way (what the driver is pointed at).
SETS = ["model.backbone=lenet_300_100", "model.num_outputs=100", "train.iterations=150", "train.lr=1e-3",
        "train.batch_size=64", "eval.max_batches=2", "progress=false", "benchmark.num_tasks=3"]


@pytest.fixture(scope="module")
def detection():
    spec = importlib.util.spec_from_file_location("nn_detection_driver", ROOT / "benchmarks" / "nn_detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    trained = tmp_path_factory.mktemp("gn") / "run"
    args = [sys.executable, "-m", "supsup", "run", "configs/permuted_mnist_gn.yaml", "--out", str(trained)]
    r = subprocess.run(args + sum([["--set", s] for s in SETS], []), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = trained.parent / "partial"
    run.mkdir()
    shutil.copy(trained / CHECKPOINT_NAME, run / CHECKPOINT_NAME)
    save_config(load_config(trained / "config.yaml", ["benchmark.num_tasks=5"]), run / "config.yaml")
    return run


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if re.match(r"\| \d", line)]


def test_seen_tasks_find_their_masks_and_new_tasks_look_new(detection, partial_run, capsys):
    assert detection.main([str(partial_run), "--n", "2", "3", "--batches", "2", "--trained", "40"]) == 0
    rows = _rows(capsys.readouterr().out)
    threshold = load_config(partial_run / "config.yaml").nn.threshold
    assert [r[0] for r in rows] == ["2", "3"]
    for _n, new, seen, after in rows:
        new_hi = float(new.split("-")[1])
        seen_lo = float(seen.split("-")[0])
        assert seen.endswith("(2/2)"), seen  # every seen batch picks its own task's mask
        assert seen_lo > new_hi  # the statistic separates seen from unseen batches
        assert new_hi < threshold < seen_lo  # ... on either side of the configured threshold
        # A fresh mask trained a little on the unseen task is already found again, and confidently.
        assert "not found" not in after and float(after) > threshold


def test_first_batch_tail_counts_misses_per_threshold(detection, partial_run, capsys):
    assert detection.main([str(partial_run), "--first-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "first batch of tasks 3-4 (2 unseen tasks)" in out
    misses = [int(c) for c in _rows_after(out, "tasks missed")]
    assert len(misses) == 5 and all(0 <= m <= 2 for m in misses)
    assert misses == sorted(misses, reverse=True)  # a higher threshold never misses more tasks


def _rows_after(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


@pytest.mark.parametrize("args, fragment", [
    (["--first-batches", "-1"], "--first-batches must be >= 0"),
    (["--n", "7"], "holds 3 masks"),
])
def test_bad_arguments_are_named(detection, partial_run, capsys, args, fragment):
    with pytest.raises(SystemExit):
        detection.main([str(partial_run), *args])
    assert fragment in capsys.readouterr().err
