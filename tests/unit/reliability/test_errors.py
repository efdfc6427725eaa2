"""The engine's error types, the output-folder check, and full-disk / permission messages."""

import errno
from pathlib import Path

import pytest

from engine import errors
from engine.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    EngineError,
    ExportError,
    LayoutError,
    PlanError,
    ResumeError,
    StorageError,
    check_writable,
    storage_error,
)


def test_every_user_error_is_an_engine_error_and_keeps_its_builtin():
    from engine.data.dataset import DataError as DatasetError
    from engine.data.records import RecordError
    from engine.data.tokenizer import TokenizerError
    from engine.models.gpt_oss.config import ConfigError as ModelConfigError
    from engine.parallel.mesh import LayoutError as MeshLayoutError

    assert ModelConfigError is ConfigError and MeshLayoutError is LayoutError and DatasetError is DataError
    for cls, builtin in [
        (ConfigError, ValueError),
        (LayoutError, ValueError),
        (DataError, ValueError),
        (RecordError, ValueError),
        (TokenizerError, ValueError),
        (ResumeError, ValueError),
        (CheckpointError, ValueError),
        (ExportError, ValueError),
        (StorageError, OSError),
        (DivergenceError, FloatingPointError),
    ]:
        assert issubclass(cls, EngineError) and issubclass(cls, builtin), cls
    # A refused memory plan is ours; a real out-of-memory error must not look like one.
    assert issubclass(PlanError, EngineError) and not issubclass(PlanError, MemoryError)


def test_checkpoint_error_takes_a_message_or_file_message_tensor():
    assert str(CheckpointError("plain")) == "plain"
    e = CheckpointError(Path("/c/model.safetensors"), "bad dtype", tensor="w")
    assert str(e) == "/c/model.safetensors: tensor 'w': bad dtype" and e.file == Path("/c/model.safetensors")


def test_memory_plan_refusal_is_a_plan_error_in_one_line():
    from engine.training.memory_plan import check_fits

    class Plan:
        total = 100 * 2**30

        def format(self):
            return "line\nline"

    with pytest.raises(PlanError) as info:
        check_fits(Plan(), 80 * 2**30, enabled=True)
    assert "\n" not in str(info.value) and "trainer.memory_check=false" in str(info.value)
    check_fits(Plan(), 80 * 2**30, enabled=False)  # the user's override still starts


def test_check_writable_creates_and_proves_the_folder(tmp_path):
    out = check_writable(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone


def test_check_writable_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"trainer\.output_dir=.*is a file, not a folder"):
        check_writable(tmp_path / "f")


def test_check_writable_refuses_a_folder_it_cannot_write():
    # /sys refuses new entries even to root (EPERM) and to everyone else (EACCES).
    with pytest.raises(StorageError, match=r"trainer\.output_dir='/sys/engine_test_run' is not writable") as info:
        check_writable("/sys/engine_test_run")
    assert isinstance(info.value, OSError) and info.value.errno in (errno.EPERM, errno.EACCES, errno.EROFS)


def test_check_writable_on_a_full_disk(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(StorageError, match="no space left on its device"):
        check_writable(tmp_path / "out")


def test_storage_error_reads_a_full_disk_however_reported(tmp_path):
    # safetensors raises its own exception type carrying the OS message
    class SafetensorError(Exception):
        pass

    e = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    err = storage_error(e, tmp_path / "hf", needs_bytes=3 * 2**30, cleanup="the partial export was removed")
    assert isinstance(err, StorageError) and err.errno == errno.ENOSPC
    text = str(err)
    assert f"while writing {tmp_path / 'hf'}" in text and "needs about 3.0 GiB" in text and "free)" in text
    assert "the partial export was removed" in text and "\n" not in text
    wrapped = RuntimeError("unexpected pos")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(storage_error(wrapped, tmp_path), StorageError)
    other = RuntimeError("shape mismatch")
    assert storage_error(other, tmp_path) is other  # anything else stays what it is


def test_size_text():
    assert errors.size_text(512) == "512 B" and errors.size_text(1536) == "1.5 KiB"
    assert errors.size_text(42 * 2**30) == "42.0 GiB"
