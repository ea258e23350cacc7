"""benchmarks/nn_detection.py on a real (tiny) GN run: its columns measure what they claim."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from supsup.checkpoint import CHECKPOINT_NAME
from supsup.config import load_config, save_config
from supsup.experiment import run_experiment

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "permuted_mnist_gn.yaml"
# Three tasks trained long enough for their masks to be told apart, in a stream of five: tasks
# 3 and 4 are unseen, as in a GN run stopped part way (what the driver is pointed at).
SETS = ["model.backbone=lenet_300_100", "model.num_outputs=100", "train.iterations=150", "train.lr=1e-3",
        "train.batch_size=64", "eval.max_batches=2", "progress=false", "benchmark.num_tasks=3"]


@pytest.fixture(scope="module")
def detection(benchmark_driver):
    return benchmark_driver("nn_detection")


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gn")
    cfg = load_config(CONFIG, SETS)
    run_experiment(cfg, root / "trained")
    run = root / "partial"
    run.mkdir()
    shutil.copy(root / "trained" / CHECKPOINT_NAME, run / CHECKPOINT_NAME)
    save_config(load_config(CONFIG, [*SETS, "benchmark.num_tasks=5"]), run / "config.yaml")
    return run


def _cells(line: str) -> list[str]:
    """The cells of one row of a markdown table."""
    return [c.strip() for c in line.strip("|").split("|")]


def test_seen_tasks_find_their_masks_and_new_tasks_look_new(detection, partial_run, capsys):
    assert detection.main([str(partial_run), "--n", "2", "3", "--batches", "2", "--trained", "40"]) == 0
    rows = [_cells(line) for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d", line)]
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
    misses = [int(c) for c in _cells(next(line for line in out.splitlines() if line.startswith("| tasks missed")))[1:]]
    assert len(misses) == 5 and all(0 <= m <= 2 for m in misses)
    assert misses == sorted(misses, reverse=True)  # a higher threshold never misses more tasks


@pytest.mark.parametrize("args, fragment", [
    (["--first-batches", "-1"], "--first-batches must be >= 0"),
    (["--n", "7"], "holds 3 masks"),
])
def test_bad_arguments_are_named(detection, partial_run, capsys, args, fragment):
    with pytest.raises(SystemExit):
        detection.main([str(partial_run), *args])
    assert fragment in capsys.readouterr().err
