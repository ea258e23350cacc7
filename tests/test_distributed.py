"""Several processes on loopback (torchrun, gloo): the same bank and accuracies as one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supsup.checkpoint import load_checkpoint

SETS = ["benchmark.num_tasks=4", "model.backbone=lenet_300_100", "model.num_outputs=100", "train.iterations=40",
        "train.lr=1e-3", "eval.max_batches=2", "progress=false"]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _run(out: Path, procs: int = 1, *extra: str, env: dict | None = None, resume: bool = False):
    """``supsup run`` (one thread per process, so that 1 and 2 processes round floats alike)."""
    args = ["run", "permuted_mnist_gn", "--threads", "1", *sum([["--set", s] for s in [*SETS, *extra]], [])]
    args += ["--resume", str(out)] if resume else ["--out", str(out)]
    if procs == 1:
        cmd = [sys.executable, "-m", "supsup", *args]
    else:
        cmd = [TORCHRUN, f"--nproc-per-node={procs}", "--master-port=0", "--rdzv-backend=c10d",
               "--rdzv-endpoint=localhost:0", "-m", "supsup", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mnist_data):
    out = tmp_path_factory.mktemp("one") / "run"
    r = _run(out)
    assert r.returncode == 0, r.stderr
    return _results(out)


def _same(a: dict, b: dict) -> None:
    assert a["bank_sha256"] == b["bank_sha256"]
    assert a["tasks"] == b["tasks"] and a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["task_confusion"] == b["task_confusion"]


def test_two_processes_give_the_bank_and_accuracies_of_one(one_process, tmp_path):
    r = _run(tmp_path / "two", 2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("mean ") == 1  # rank 0 alone reports
    _same(one_process, _results(tmp_path / "two"))
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert not [n for n in names if n.endswith(".tmp")]


def test_resume_with_another_number_of_processes(one_process, tmp_path):
    """Killed after the first checkpoint, resumed 2 -> 1 and 1 -> 2 processes: the same bank."""
    a = tmp_path / "two_then_one"
    r = _run(a, 2, env={"SUPSUP_CRASH_AT": "checkpoint_write:2"})
    assert r.returncode != 0
    assert load_checkpoint(a)[1]["loop"]["next_task"] == 2  # the first round's checkpoint is intact
    assert _run(a, 1, resume=True).returncode == 0
    _same(one_process, _results(a))
    b = tmp_path / "one_then_two"
    r = _run(b, 1, env={"SUPSUP_CRASH_AT": "checkpoint_write:2"})
    assert r.returncode == -signal.SIGKILL and load_checkpoint(b)[1]["loop"]["next_task"] == 1
    r = _run(b, 2, resume=True)
    assert r.returncode == 0, r.stderr
    _same(one_process, _results(b))


def test_a_rank_that_dies_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = _run(out, 2, env={"SUPSUP_CRASH_AT": "parallel_round:2", "SUPSUP_CRASH_RANK": "1"})
    assert r.returncode != 0
    # torchrun stops the other rank and names the one that died as the root cause
    assert "rank      : 1 (local_rank: 1)" in r.stderr.split("Root Cause")[-1]
    _, meta = load_checkpoint(out)  # written after round 1, intact
    assert meta["loop"]["next_task"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    shutil.rmtree(out)


@pytest.mark.parametrize("extra, key", [(["scenario=NN"], "scenario"),
                                        (["backend=avalanche", "benchmark.permutation_source=avalanche"], "backend")])
def test_what_cannot_run_in_parallel_is_refused_in_one_line(tmp_path, extra, key):
    """Every rank exits with code 2; rank 0 says why in one line (torchrun then reports the
    failed workers in its own words)."""
    r = _run(tmp_path / "x", 2, *extra)
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("supsup: error:")]
    assert len(errors) == 1 and f"error: {key}:" in errors[0]


def test_task_rows_with_batchnorm_statistics_survive_the_wire():
    """A task's rows travel as bytes after a flag byte: float32 statistics that follow the packed
    masks land at odd offsets and must come back bit for bit (and a model that imports them
    answers as the one that trained the task)."""
    import torch

    from supsup.experiment.distributed import pack_task_rows, unpack_task_rows
    from supsup.model import SupermaskModel

    def model():
        return SupermaskModel.from_name("conv4_bn", num_tasks=2, num_outputs=10, seed=0, input_shape=(1, 28, 28))

    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    src = model()
    src.add_task()
    src.train_mode()
    src(x)  # the task's running statistics move away from 0 and 1
    _, rows = src.export_task()
    assert any(k.startswith("norm.") for k in rows)
    like = {k: torch.zeros_like(v) for k, v in rows.items()}
    back = unpack_task_rows(pack_task_rows(rows, like), like)
    assert back.keys() == rows.keys()
    for k in rows:
        assert back[k].dtype == rows[k].dtype and torch.equal(back[k], rows[k]), k
    assert unpack_task_rows(pack_task_rows(None, like), like) is None

    dst, ref = model(), model()
    dst.import_tasks(back)
    ref.import_tasks(rows)
    with dst.use_task(0), ref.use_task(0):
        assert torch.equal(dst(x), ref(x))


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    """Every rank would build on the one GPU named while NCCL wants one GPU per rank."""
    import torch

    from supsup.config import ConfigError
    from supsup.experiment.distributed import Distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        Distributed.from_env(torch.device("cuda", 0))


def _alive(pid: int) -> bool:
    """Running (a zombie left for a parent that does not reap it has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: field 4 of /proc/<p>/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_workers_end_when_the_launcher_is_killed(mnist_data, tmp_path):
    """SIGKILL to torchrun: its workers (in sessions of their own) notice within a second and
    stop, instead of finishing the run into a directory a --resume may be writing."""
    import time

    out = tmp_path / "run"
    cmd = [TORCHRUN, "--nproc-per-node=2", "--master-port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
           "-m", "supsup", "run", "permuted_mnist_gn", "--threads", "1", "--out", str(out),
           *sum([["--set", s] for s in [*SETS, "benchmark.num_tasks=8", "train.iterations=300"]], [])]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 60  # a bound that fails the test only if the workers never stop
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    alive = [w for w in workers if _alive(w)]
    for w in alive:  # leave nothing behind, whatever happened
        os.kill(w, signal.SIGKILL)
    assert not alive, "workers outlived their launcher"
    assert load_checkpoint(out)[1]["loop"]["next_task"] < 8  # stopped mid-run; --resume continues it


def test_two_processes_resume_inside_a_round_bitwise(one_process, tmp_path):
    """train.checkpoint_every under torchrun: every rank's task in training is checkpointed
    inside a round; killed right after such a checkpoint inside the second round, the run
    resumes with 2 processes from inside the round, or with 1 process from the round's start,
    and both end with the bank and accuracies of one uninterrupted process."""
    out = tmp_path / "cut"
    # rounds of 2 tasks, checkpoints at steps 10, 20, 30 of each: the 4th is inside the second round
    r = _run(out, 2, "train.checkpoint_every=10",
             env={"SUPSUP_CRASH_AT": "inside_task_checkpoint:4", "SUPSUP_CRASH_RANK": "0"})
    assert r.returncode != 0
    tensors, meta = load_checkpoint(out)
    assert meta["loop"] == {"next_task": 2, "active_task": 2, "world": 2}, meta["loop"]
    assert [int(tensors[f"rank{r}.progress.step"]) for r in range(2)] == [10, 10]
    again = tmp_path / "again"
    shutil.copytree(out, again)
    r = _run(out, 2, "train.checkpoint_every=10", resume=True)
    assert r.returncode == 0, r.stderr
    _same(one_process, _results(out))
    r = _run(again, 1, "train.checkpoint_every=10", resume=True)  # another number of processes
    assert r.returncode == 0, r.stderr
    _same(one_process, _results(again))
