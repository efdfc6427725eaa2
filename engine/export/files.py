"""The files of an export, around the writers: leftovers of killed exports removed, a full disk said
plainly, and the written files given the modes of any file the user writes.

An export is written into a hidden sibling `.NAME.partial-PID-RANDOM` that is renamed to NAME at the
end (engine/checkpoint/atomic_dir.py). A process killed meanwhile leaves that folder behind (about
42 GB for a 20B full fine-tune); the next export to the same NAME removes it once its process is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import StorageError, storage_error

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Remove `.NAME.partial-PID-*` / `.NAME.old-PID-*` siblings of `target` left by processes that
    are no longer running (a live one may still be writing). Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-(\d+)-[0-9a-f]+")
    removed = []
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or int(match.group(2)) == os.getpid() or _alive(int(match.group(2))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted export (process %s is gone)", path, match.group(2))
        removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(folder: str | Path) -> None:
    """Files 0666 and folders 0777, less the umask (0644 / 0755 usually): what `open()` and `mkdir`
    give. safetensors creates its files 0600, readable by their owner only."""
    mask = _umask()
    folder = Path(folder)
    for path in (folder, *folder.rglob("*")):
        if path.is_symlink():
            continue
        mode = 0o777 if path.is_dir() else 0o666
        if stat.S_IMODE(path.stat().st_mode) != mode & ~mask:
            path.chmod(mode & ~mask)


@contextmanager
def export_target(out: str | Path, needs_bytes: int | None = None) -> Iterator[Path]:
    """Around one export to `out`: leftovers of killed exports removed first; on a full disk or a
    folder that cannot be written, a one-line StorageError naming the file (the writer has already
    removed its partial folder); at the end, normal file modes."""
    out = Path(out)
    remove_stale_partials(out)
    try:
        yield out
    except Exception as e:  # noqa: BLE001 (only a full disk or a permission problem is translated)
        if isinstance(e, StorageError):
            raise
        err = storage_error(e, out, needs_bytes, cleanup="the partial export was removed")
        if err is e:
            raise
        raise err from None
    if out.is_dir():
        normal_modes(out)
