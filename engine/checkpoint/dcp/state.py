"""Training checkpoints for exact resume: torch.distributed.checkpoint (DCP), complete or absent.

Layout: OUTPUT/checkpoints/step_0000040/
    .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: every tensor once, as global tensors; expert
                                                 weights as chunks of the full [E, ...] tensor, so any
                                                 world size / EP degree / sharding reads its own part
    rank00000.json, rank00001.json, ...          per-rank JSON: data-loader position, RNG states
    meta.json                                    written LAST: step, layout, scheduler, the run's config,
                                                 the sha256 of every other file (engine.checkpoint.dcp.checksums)

Nothing in a checkpoint is unpickled with code: tensors are read by torch's `weights_only` loader, DCP's
`.metadata` by a restricted unpickler (engine.checkpoint.dcp.safe_reader), everything else is JSON.

A save goes to a hidden `.tmp_step_*` folder; rank 0 writes meta.json after every rank's data is on disk
and renames the folder into place, so a crash at any point leaves the previous checkpoints untouched and
no half one (the leftover `.tmp_*` folder is removed at the next start). With `checkpoint.async=true`
the tensors are copied to host memory at the save step and written by a background thread while the
next steps run; rank 0 completes the checkpoint (meta.json + rename) when the write has finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from engine.checkpoint.dcp.checksums import ChecksumWriter
from engine.checkpoint.dcp.safe_reader import (
    METADATA_FILE,
    CheckpointCorruptError,
    SafeFileSystemReader,
    _first_line,
    read_metadata_file,
)
from engine.checkpoint.errors import CheckpointError, CheckpointNotFoundError
from engine.errors import storage_error

log = logging.getLogger(__name__)
# DCP's warning when it runs in one process: a layout like any other here, not a mistake to warn about.
_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"
STEP_PREFIX = "step_"
FORMAT = "engine-dcp-1"


@contextlib.contextmanager
def _one_process_quiet(alone: bool):
    """DCP's one-process warning silenced for the call inside (and nothing else, nowhere else)."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> str:
    """JSON written to a temporary name, fsynced and renamed: the file is whole or absent. Returns the
    sha256 of the bytes written."""
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointCorruptError(path, "missing; the checkpoint is incomplete, use an earlier one") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(
            path, f"not valid JSON ({e}); the checkpoint is corrupt, use an earlier one"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointCorruptError(path, "not a JSON object; the checkpoint is corrupt, use an earlier one")
    return value


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"{STEP_PREFIX}{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank{rank:05d}.json"


def remove_debris(output_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves leave behind (`.tmp_*`, `.old_*` folders, `*.partial` files).
    Call on rank 0 before the run's first save, when no save of this run is in flight."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if p.name.startswith((".tmp_", ".old_")) or p.name.endswith(".partial"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _local_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """What this rank writes: the local shard of each DTensor, plain tensors whole."""
    local = (getattr(t, "_local_tensor", t) for t in tensors.values())
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor))


class _SaveFailure:
    """Turns an error met while writing a checkpoint into the user's one line (a full disk, a folder
    that cannot be written) after rank 0 has removed the unfinished `.tmp_*` folder, so a failed save
    leaves nothing on the disk and the earlier checkpoints as they were."""

    def __init__(self, tmp: Path, rank: int, needs_bytes: int):
        self.tmp, self.rank, self.needs_bytes = tmp, rank, needs_bytes

    def raise_(self, e: BaseException) -> None:
        """Called in the `except` block that caught `e`; always raises. The free space is measured before
        the unfinished folder is removed: what the write had, not what the cleanup gave back."""
        err = storage_error(
            e, self.tmp, self.needs_bytes, cleanup="the unfinished checkpoint was removed and the earlier ones are kept"
        )
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if err is e:
            raise  # not the user's to fix: the original error, traceback and all
        raise err from e


class PendingSave:
    """A checkpoint being written in the background (checkpoint.async=true). `poll()` each step
    completes it on rank 0 once written; `wait()` (every rank together) blocks until it is complete."""

    def __init__(
        self,
        future,
        finalize: Callable[[], None],
        rank: int,
        barrier: Callable[[], None],
        path: Path,
        failure: _SaveFailure,
    ):
        self.future, self._finalize, self.rank, self._barrier, self.path = future, finalize, rank, barrier, path
        self._failure = failure
        self.finalized = False

    def poll(self) -> bool:
        if not self.finalized and self.future.done():
            try:
                self.future.result()  # re-raises a failed write
                if self.rank == 0:
                    self._finalize()
            except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
                self._failure.raise_(e)
            self.finalized = True
        return self.finalized

    def wait(self) -> Path:
        try:
            self.future.result()
        except BaseException as e:  # noqa: BLE001
            self._failure.raise_(e)
        self._barrier()
        self.poll()
        self._barrier()
        return self.path


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    rank_state: dict,
    meta: dict,
    *,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep: int = 2,
    process_group=None,
    asynchronous: bool = False,
    checksums: bool = True,
) -> Path | PendingSave:
    """Write one checkpoint. `tensors`: FQN -> tensor or DTensor (global view; replicated entries are
    written once by DCP's de-duplication); `rank_state`: this rank's JSON; `meta`: rank 0's JSON.
    Every rank calls this together. Returns the final path (sync) or a PendingSave (async). With
    `checksums`, meta.json records the sha256 of every other file, hashed as it is written.
    A write that fails (full disk, permissions) raises StorageError after removing the unfinished
    checkpoint; the earlier checkpoints are untouched."""
    root = checkpoints_root(output_dir)
    final = step_dir(output_dir, step)
    tmp = root / f".tmp_{final.name}"
    failure = _SaveFailure(tmp, rank, _local_bytes(tensors))
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # debris of an earlier crashed save of the same step
            tmp.mkdir()
        barrier()
        rank_sha = _write_json(rank_file(tmp, rank), rank_state)
    except BaseException as e:  # noqa: BLE001
        failure.raise_(e)
    meta = {"format": FORMAT, "step": step, **meta}
    extra = {rank_file(tmp, rank).name: rank_sha} if checksums else {}
    writer = ChecksumWriter(str(tmp), hashing=checksums, extra=extra, sync_files=True, thread_count=1)

    def finalize() -> None:
        _write_json(tmp / "meta.json", {**meta, "checksums": writer.checksums} if checksums else meta)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: swap atomically, then drop the old one
            old = root / f".old_{final.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)

    alone = not (dist.is_available() and dist.is_initialized())
    try:
        if asynchronous:
            if alone:  # DCP warns from its own writer thread, which a scoped filter cannot reach
                warnings.filterwarnings("ignore", message=_ONE_PROCESS)
            future = dcp.async_save(tensors, storage_writer=writer, process_group=process_group, no_dist=alone)
            return PendingSave(future, finalize, rank, barrier, final, failure)
        with _one_process_quiet(alone):
            dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=alone)
        barrier()
        if rank == 0:
            finalize()
    except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
        failure.raise_(e)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Step folders without meta.json: never resumed from, named when skipped."""
    root = checkpoints_root(output_dir)
    found = root.iterdir() if root.is_dir() else ()
    return sorted(p for p in found if p.name.startswith(STEP_PREFIX) and p.is_dir() and not is_complete(p))


def resume_candidates(output_dir: str | Path, resume: str) -> list[Path]:
    """Checkpoints to try, in order: `auto` the complete ones of this run, newest first (the caller
    falls back to the next when one cannot be read); `none` nothing; else exactly the given path."""
    if resume == "none":
        return []
    if resume == "auto":
        return complete_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointNotFoundError(path, f"trainer.resume={resume!r}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointNotFoundError(
            path,
            f"trainer.resume={resume!r}: the checkpoint is incomplete (no meta.json); "
            "it was interrupted while saving, pick an earlier one",
        )
    return [path]


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The first candidate of `resume_candidates`, or None."""
    found = resume_candidates(output_dir, resume)
    return found[0] if found else None


def read_meta(path: Path) -> dict:
    meta = read_json(path / "meta.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            path / "meta.json",
            f"format {meta.get('format')!r} is not {FORMAT!r}: this "
            "checkpoint was written by another version of the engine and cannot be resumed",
        )
    return meta


def tensor_shapes(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Global shape and dtype of every tensor in a checkpoint, from its metadata (no data read)."""
    md = read_metadata_file(path / METADATA_FILE)
    out = {}
    for key, item in md.state_dict_metadata.items():
        if not hasattr(item, "size"):
            raise CheckpointCorruptError(path / METADATA_FILE, f"entry {key!r} is not a tensor")
        out[key] = (item.size, item.properties.dtype)
    return out


def load_tensors(path: Path, tensors: dict[str, torch.Tensor], process_group=None, *, alone: bool = False) -> None:
    """Fill `tensors` (FQN -> tensor or DTensor, any layout) in place from the checkpoint at `path`;
    every rank calls this together, or one process `alone` (plain tensors). Errors name the file."""
    alone = alone or not (dist.is_available() and dist.is_initialized())
    try:
        with _one_process_quiet(alone):
            dcp.load(
                tensors, storage_reader=SafeFileSystemReader(str(path)), process_group=process_group, no_dist=alone
            )
    except CheckpointException as e:
        # DCP wraps each rank's failure as (exception, traceback); ours already name the file.
        inner = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        for exc in inner:
            if isinstance(exc, CheckpointError):
                raise exc from None
        first = inner[0] if inner else e
        raise CheckpointCorruptError(path, f"cannot be loaded ({type(first).__name__}: {_first_line(first)})") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a key missing from the checkpoint
        raise CheckpointCorruptError(path, f"cannot be loaded ({type(e).__name__}: {_first_line(e)})") from None
