"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

A DCP folder holds `.metadata` (a pickle of plain dataclasses describing every tensor chunk) and
`__R_N.distcp` data files (each tensor a `torch.save` blob, which DCP reads with torch's own
`weights_only=True` unpickler). The stock reader opens `.metadata` with `pickle.load`, which would run
whatever a crafted file asks for. `SafeFileSystemReader` reads it with an unpickler that knows only the
classes DCP's metadata is made of; anything else is refused with the file's name. Every error while
reading a checkpoint is raised as `CheckpointCorruptError` naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from engine.checkpoint.errors import CheckpointError

METADATA_FILE = ".metadata"

# (module, name) pairs DCP's metadata pickle refers to; nothing here can run code when called with
# any arguments a pickle can give it.
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file that cannot be read (truncated, garbage, or not what the engine wrote)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a checkpoint's metadata")


def read_metadata_file(path: str | Path) -> Metadata:
    """DCP metadata from `path` with the restricted unpickler; CheckpointCorruptError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except FileNotFoundError:
        raise CheckpointCorruptError(path, "missing; the checkpoint is incomplete, use an earlier one") from None
    except Exception as e:  # noqa: BLE001 - any failure to decode is a corrupt file, named
        raise CheckpointCorruptError(
            path,
            f"not a valid checkpoint metadata file ({type(e).__name__}: {e}); "
            "the checkpoint is corrupt, use an earlier one",
        ) from None
    if not isinstance(meta, Metadata):
        raise CheckpointCorruptError(
            path,
            f"holds a {type(meta).__name__}, not checkpoint metadata; the checkpoint is corrupt, use an earlier one",
        )
    return meta


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read without executing code, and whose read errors name the file."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        meta = read_metadata_file(Path(self._get_metadata_path(rank)))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - name the files this rank was reading
            files = sorted({self.storage_data[r.storage_index].relative_path for r in plan.items})
            where = ", ".join(str(Path(self.path) / f) for f in files)
            raise CheckpointCorruptError(
                where,
                f"cannot read checkpoint data ({type(e).__name__}: "
                f"{_first_line(e)}); the checkpoint is corrupt, "
                "use an earlier one",
            ) from None
