"""The checksummed file format and the atomic write, on small synthetic payloads (the
end-to-end kill-and-resume tests are in test_runner.py)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest
import torch

from supsup import fileio
from supsup.checkpoint import (
    CHECKPOINT_MAGIC,
    CHECKPOINT_NAME,
    MODEL_MAGIC,
    CheckpointError,
    load_checkpoint,
    read_checksummed,
    save_checkpoint,
    write_checksummed,
)
from supsup.experiment.runstate import config_mismatch


def _payload():
    return {"bank.0": torch.arange(24, dtype=torch.uint8).view(3, 8), "nested": {"a": [1, 2.5, "x"]}}


def test_round_trip_is_exact(tmp_path):
    path = save_checkpoint(tmp_path, _payload(), {"loop": {"next_task": 2}, "f": 0.1})
    assert path == tmp_path / CHECKPOINT_NAME
    tensors, meta = load_checkpoint(tmp_path)
    assert torch.equal(tensors["bank.0"], _payload()["bank.0"]) and tensors["nested"] == {"a": [1, 2.5, "x"]}
    assert meta == {"loop": {"next_task": 2}, "f": 0.1}
    raw = path.read_bytes()
    assert raw.startswith(CHECKPOINT_MAGIC)
    head = len(CHECKPOINT_MAGIC)
    assert raw[head: head + 32] == hashlib.sha256(raw[head + 32:]).digest()


@pytest.mark.parametrize("position", [0.2, 0.5, 0.99])
def test_any_flipped_byte_is_refused(tmp_path, position):
    path = save_checkpoint(tmp_path, _payload(), {})
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * position)] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(tmp_path)


def test_a_short_or_foreign_file_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(CHECKPOINT_MAGIC + b"\0" * 10)  # the header cut short
    with pytest.raises(CheckpointError, match="bad header"):
        load_checkpoint(tmp_path)
    path.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="bad header"):
        load_checkpoint(tmp_path)
    write_checksummed(path, {}, {}, magic=MODEL_MAGIC)
    with pytest.raises(CheckpointError, match="is a supsup model file, not a supsup checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent")


def test_a_file_cut_right_after_its_header_fails_the_checksum(tmp_path):
    """The boundary between "bad header" and "bad payload": a whole header with nothing after
    it is a truncated checkpoint, refused by its checksum, with the full message."""
    path = save_checkpoint(tmp_path, _payload(), {})
    path.write_bytes(path.read_bytes()[:len(CHECKPOINT_MAGIC) + 32])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == (f"{path} is corrupted: its SHA-256 checksum does not match (truncated or modified); "
                              "not using it")


def test_an_atomic_write_flushes_the_file_and_then_its_directory(tmp_path, monkeypatch):
    """Durability: the data is fsynced before the rename, the directory entry after it (a
    crash after the rename must not lose the new name)."""
    import os

    events = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace
    dirs = {}

    def track_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if os.path.isdir(path):
            dirs[fd] = os.fspath(path)
        return fd

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", dirs.get(fd, "file"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(b))), real_replace(a, b)))
    fileio.atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert events == [("fsync", "file"), ("replace", str(tmp_path / "out.bin")), ("fsync", str(tmp_path))]
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def _forged(path, payload: bytes, magic=CHECKPOINT_MAGIC):
    path.write_bytes(magic + hashlib.sha256(payload).digest() + payload)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_never_loaded(tmp_path, capsys):
    """A file with a valid checksum but a pickled object inside: weights_only refuses it."""
    buf = io.BytesIO()
    torch.save({"tensors": {"x": _Evil()}, "meta": "{}"}, buf)
    _forged(tmp_path / CHECKPOINT_NAME, buf.getvalue())
    with pytest.raises(CheckpointError, match="valid checksum but unreadable content"):
        load_checkpoint(tmp_path)
    assert "unpickled!" not in capsys.readouterr().out
    _forged(tmp_path / CHECKPOINT_NAME, pickle.dumps({"tensors": {}, "meta": "{}"}))
    with pytest.raises(CheckpointError, match="valid checksum but unreadable content"):
        load_checkpoint(tmp_path)


def test_a_payload_of_the_wrong_shape_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"tensors": [1, 2], "meta": json.dumps({})}, buf)
    _forged(tmp_path / CHECKPOINT_NAME, buf.getvalue())
    with pytest.raises(CheckpointError, match="unexpected file structure"):
        load_checkpoint(tmp_path)
    buf = io.BytesIO()
    torch.save({"tensors": {}, "meta": "not json"}, buf)
    _forged(tmp_path / CHECKPOINT_NAME, buf.getvalue())
    with pytest.raises(CheckpointError, match="unreadable content"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="unreadable content"):
        read_checksummed(tmp_path / CHECKPOINT_NAME, magic=CHECKPOINT_MAGIC)


class _Crash(Exception):
    pass


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _payload(), {"version": 1})
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def crash(point):
        assert point == "checkpoint_write"
        raise _Crash

    monkeypatch.setattr(fileio, "maybe_crash", crash)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, _payload(), {"version": 2})
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # the temporary file is gone


def test_a_digest_mismatch_puts_nothing_in_place(tmp_path):
    with pytest.raises(fileio.ChecksumMismatch, match="SHA-256 mismatch"):
        fileio.atomic_write_bytes(tmp_path / "f", [b"abc", b"def"], sha256=hashlib.sha256(b"abcdeX").hexdigest())
    assert list(tmp_path.iterdir()) == []
    fileio.atomic_write_bytes(tmp_path / "f", [b"abc", b"def"], sha256=hashlib.sha256(b"abcdef").hexdigest())
    assert (tmp_path / "f").read_bytes() == b"abcdef"


def test_config_mismatch_names_every_differing_key_but_the_resume_free_ones():
    saved = {"seed": 0, "progress": True, "train": {"lr": 1e-4, "iterations": 10},
             "inference": {"group_size": 128, "method": "one_shot"}}
    now = {"seed": 1, "progress": False, "train": {"lr": 1e-4, "iterations": 11},
           "inference": {"group_size": 7, "method": "one_shot"}, "new": 3}
    assert config_mismatch(saved, now) == ["new (checkpoint: None, now: 3)", "seed (checkpoint: 0, now: 1)",
                                           "train.iterations (checkpoint: 10, now: 11)"]
    assert config_mismatch(saved, saved) == []


def test_new_files_follow_a_permissive_umask_too(tmp_path):
    import os

    old = os.umask(0)
    try:
        fileio.atomic_write_text(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666


def test_temporary_files_sit_beside_the_target_and_carry_its_name(tmp_path, monkeypatch):
    """A temporary file in the target's directory (a rename never crosses file systems), named
    after it with the given suffix, so that a leftover is recognisable."""
    seen = []

    def crash(point):
        seen.extend(p.name for p in (tmp_path / "sub" / "deeper").iterdir())
        raise _Crash

    monkeypatch.setattr(fileio, "maybe_crash", crash)
    with pytest.raises(_Crash):
        fileio.atomic_write_bytes(tmp_path / "sub" / "deeper" / "f.bin", b"0123456789", crash_point="x", suffix=".part")
    assert len(seen) == 1 and seen[0].startswith(".f.bin.") and seen[0].endswith(".part")
    assert list((tmp_path / "sub" / "deeper").iterdir()) == []
    seen.clear()  # by default, leftovers end in .tmp (what .gitignore and users look for)
    with pytest.raises(_Crash):
        fileio.atomic_write_bytes(tmp_path / "sub" / "deeper" / "f.bin", b"0123456789", crash_point="x")
    assert len(seen) == 1 and seen[0].endswith(".tmp")
    written = []
    with pytest.raises(_Crash):
        fileio.atomic_write(tmp_path / "g.bin", lambda tmp: (written.append(tmp.name), crash("y")))
    assert written[0].endswith(".tmp")


def test_a_failed_write_that_removed_its_file_raises_its_own_error(tmp_path):
    """A writer that cleans up after itself before failing: the cleanup finds nothing to remove
    and the writer's error comes out unchanged."""
    def write(tmp):
        tmp.unlink()
        raise ValueError("the writer failed")

    with pytest.raises(ValueError, match="the writer failed"):
        fileio.atomic_write(tmp_path / "f.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_path_is_a_checkpoint_error(tmp_path):
    (tmp_path / CHECKPOINT_NAME).mkdir()  # a directory where the file should be
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)


def test_config_written_before_a_key_existed_matches_its_default():
    """A checkpoint from an older version lacks newer keys (model.norm); with their default
    values now, the run may resume."""
    from supsup.config import RunConfig, config_to_dict

    now = config_to_dict(RunConfig())
    old = config_to_dict(RunConfig())
    del old["model"]["norm"]
    assert config_mismatch(old, now) == []
    now["model"]["norm"] = "shared"
    assert config_mismatch(old, now) == ["model.norm (checkpoint: None, now: 'shared')"]


def test_the_same_state_gives_the_same_bytes(tmp_path):
    """A file is a function of its content, not of the order a dict was filled in (two ranks,
    or a run and its resumption, write byte-identical files for the same state)."""
    write_checksummed(tmp_path / "a", _payload(), {"x": 1, "y": {"b": 2, "a": 3}}, magic=CHECKPOINT_MAGIC)
    write_checksummed(tmp_path / "b", _payload(), {"y": {"a": 3, "b": 2}, "x": 1}, magic=CHECKPOINT_MAGIC)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_a_missing_file_names_the_reason(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot read .*: Is a directory"):
        (tmp_path / "d").mkdir()
        read_checksummed(tmp_path / "d", magic=CHECKPOINT_MAGIC)


def test_loop_and_training_state_round_trip_and_refuse_bad_input():
    """A checkpoint's loop state and its mask in training, typed: what is written is read back;
    a loop without a valid next task, or scores without their optimizer, is refused."""
    import torch

    from supsup.experiment.runstate import LoopState, TrainingState

    for loop in (LoopState(3), LoopState(2, active_task=1, nn={"allocations": [0, 1]})):
        assert LoopState.from_dict(loop.to_dict()) == loop
    assert LoopState.from_dict({"next_task": 4, "num_learned": 4}) == LoopState(4)  # written by 0.2.0 and earlier
    for bad in (None, {}, {"next_task": -1}, {"next_task": "2"}, {"next_task": 1, "active_task": -3}):
        with pytest.raises(ValueError):
            LoopState.from_dict(bad)
    state = TrainingState(scores=[torch.arange(3.0), torch.ones(2, 2)], optimizer={"state": {}, "param_groups": []},
                          sampler=torch.tensor([7]), calibration={"x": torch.zeros(2, 4), "y": torch.tensor([1, 2])})
    back = TrainingState.from_tensors({"bank.0": torch.zeros(1, 8), **state.to_tensors()})
    assert all(torch.equal(a, b) for a, b in zip(back.scores, state.scores)) and len(back.scores) == 2
    assert back.optimizer == state.optimizer and torch.equal(back.sampler, state.sampler)
    assert set(back.calibration) == {"x", "y"} and torch.equal(back.calibration["y"], state.calibration["y"])
    assert TrainingState.from_tensors({"bank.0": torch.zeros(1, 8)}) is None
    with pytest.raises(CheckpointError, match="optimizer"):
        TrainingState.from_tensors({"scores.000": torch.zeros(3)})
