"""The engine's user-facing errors: problems a user causes and can fix (config, layout, data, resume,
memory plan, checkpoint and export files, output folder), each with a one-line message that names
the key, file or value and says what to do.

`engine/train.py` prints such an error as one line and exits with code 2 on every rank; any other
exception is a bug and keeps its traceback. Every class also subclasses the builtin that callers
knowing only the builtins would catch (ValueError, OSError, ...).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class EngineError(Exception):
    """Base of every user-facing error: one line, exit code 2."""


class ConfigError(EngineError, ValueError):
    """A config key with a bad value, a misspelt key, a bad recipe or a bad model config.json."""


class LayoutError(ConfigError):
    """A parallel layout this engine cannot run (raised identically on every rank, before any collective)."""


class DataError(EngineError, ValueError):
    """Training data that cannot be used as given; the message starts with `file:line:` where there is one."""


class ResumeError(EngineError, ValueError):
    """A checkpoint that does not fit this run (other recipe, other data, other layout)."""


class PlanError(EngineError):
    """The memory plan exceeds the device: refused before any weight is loaded. Deliberately not the
    builtin MemoryError, so a real out-of-memory error still shows as the bug or limit it is."""


class DivergenceError(EngineError, FloatingPointError):
    """Training stopped by the NaN guard: too many steps with non-finite loss or gradients."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint (training or HF) that cannot be read: `CheckpointError(message)` or
    `CheckpointError(file, message, tensor=None)`, which prefixes the file (and tensor) to the message."""

    def __init__(self, file_or_message, message: str | None = None, tensor: str | None = None):
        if message is None:
            super().__init__(str(file_or_message))
            self.file, self.tensor = None, tensor
            return
        where = str(file_or_message) if file_or_message is not None else "checkpoint"
        if tensor is not None:
            where += f": tensor {tensor!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.tensor = file_or_message, tensor


class ExportError(EngineError, ValueError):
    """An export that cannot be written as asked (format, target folder, disk space)."""


class StorageError(EngineError, OSError):
    """The output folder cannot be written: permissions, a full disk, a file where a folder should be.
    `StorageError(errno, message)`; prints as the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)


def import_failure(package: str, e: ImportError) -> str:
    """Why an optional `package` cannot be used, in one line: "not installed" only when it is absent;
    an installed package whose import fails (a broken or mismatched dependency) is named with its error."""
    if isinstance(e, ModuleNotFoundError) and e.name == package:
        return f"{package} is not installed"
    first = (str(e).splitlines() or [""])[0]
    return f"{package} is installed but cannot be imported ({type(e).__name__}: {first})"


def size_text(n_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    for p in (path, *path.parents):
        if p.exists() and os.path.ismount(p):
            return p
    return Path("/")


def disk_full(e: BaseException) -> bool:
    """A full disk, however the writer reports it: an OSError, or a library's own error that carries
    the OS message (safetensors: "I/O error: No space left on device (os error 28)")."""
    seen = 0
    while e is not None and seen < 8:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def storage_error(e: BaseException, path: str | Path, needs_bytes: int | None = None,
                  cleanup: str = "") -> BaseException:
    """The user-facing form of an error met while writing `path`: a full disk (saying how much the
    write needed and how much is free) or a permission problem; anything else is returned as is.
    `cleanup` says what was removed, e.g. "the partial export was removed"."""
    target = Path(e.filename) if getattr(e, "filename", None) else Path(path)
    if disk_full(e):
        free = _free_bytes(target)
        needs = f"needs about {size_text(needs_bytes)}, " if needs_bytes else ""
        room = f" ({needs}{size_text(free)} free)" if free is not None else ""
        return StorageError(errno.ENOSPC, f"no space left on the device mounted at {_mount_point(target)} while "
                            f"writing {target}{room}; free some space or choose another folder"
                            + (f"; {cleanup}" if cleanup else ""))
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(e.errno, f"cannot write {target}: {os.strerror(e.errno)}; choose a folder you can "
                            "write (trainer.output_dir=...) or fix its permissions")
    return e


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def check_writable(folder: str | Path, key: str = "trainer.output_dir") -> Path:
    """Create `folder` if needed and prove a file can be written and removed there, before any
    hour of training depends on it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StorageError(errno.ENOTDIR, f"{key}={str(folder)!r} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StorageError(e.errno, f"{key}={str(folder)!r}: no space left on its device; free some space "
                               "or choose another folder") from None
        raise StorageError(e.errno or errno.EACCES, f"{key}={str(folder)!r} is not writable "
                           f"({e.strerror or e}: {e.filename or folder}); choose a folder you can write "
                           "or fix its permissions") from None
    return folder
