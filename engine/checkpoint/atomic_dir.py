"""Write a directory so that it is either complete or absent under its final name.

Everything is written into a hidden sibling (`.NAME.partial-PID-RANDOM`, same filesystem, so the final
rename is atomic) that is renamed to NAME at the end. A crash leaves only that hidden folder, never a
half-written NAME that looks like a finished export; an exception removes it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.checkpoint.errors import CheckpointExistsError


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `target` when the block succeeds.

    An existing non-empty `target` is an error unless `overwrite`; then it is swapped out by two
    renames (the old copy is deleted only once the new one is in place)."""
    target = Path(target)
    if target.exists() and not _is_empty_dir(target) and not overwrite:
        raise CheckpointExistsError(
            f"{target}: already exists and is not empty; choose another output directory "
            "or pass overwrite=True (--overwrite) to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(target, "partial")
    partial.mkdir()  # mode from the umask, unlike tempfile.mkdtemp's private 0700
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not target.exists() or _is_empty_dir(target):
        os.replace(partial, target)  # rename(2) may replace an empty directory
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    os.rename(partial, target)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
