"""Sharded safetensors checkpoints, read and written one tensor at a time.

Reading: `SafetensorsIndex` learns every tensor's file, shape and dtype from the headers alone (a
single `model.safetensors`, or the shards named by `model.safetensors.index.json`), then `read`
fetches one row range of one tensor (`safe_open` + `get_slice`). A file is opened per read and closed
right after, so no mapping of a shard outlives the read that needed it, and a rank that reads only its
experts' rows never touches the other experts' bytes.

Writing: `ShardWriter` packs tensors into shards of at most `max_shard_size` bytes in arrival order
(a larger tensor gets a shard of its own), as `save_pretrained` does, and names them
`model-0000k-of-0000n.safetensors` + index once the count is known; one shard is `model.safetensors`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.checkpoint.errors import CheckpointError, CheckpointNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # the safetensors dtype name when torch has no equivalent (e.g. F8_E4M3)


class SafetensorsIndex:
    """Where each tensor of a checkpoint directory lives, from the headers only."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index_file = self.directory / INDEX_FILE
        self.infos: dict[str, TensorInfo] = {}
        if self.index_file.exists():
            by_file = self._read_weight_map()
        elif (self.directory / SINGLE_FILE).exists():
            self.index_file = None
            by_file = {SINGLE_FILE: None}
        else:
            raise CheckpointNotFoundError(
                self.directory, f"has neither {SINGLE_FILE} nor {INDEX_FILE}; point at an HF checkpoint directory"
            )
        for file_name, listed in by_file.items():
            self._scan(self.directory / file_name, listed)

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def where(self, name: str) -> Path:
        """The file a missing or wrong tensor should be reported against."""
        if name in self.infos:
            return self.infos[name].file
        return self.index_file or self.directory / SINGLE_FILE

    def _read_weight_map(self) -> dict[str, list[str]]:
        try:
            weight_map = json.loads(self.index_file.read_text())["weight_map"]
        except json.JSONDecodeError as e:
            raise CheckpointError(self.index_file, f"invalid JSON at line {e.lineno}: {e.msg}") from None
        except (KeyError, TypeError):
            raise CheckpointError(
                self.index_file, "has no 'weight_map' object; is it an HF safetensors index?"
            ) from None
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        return by_file

    def _scan(self, file: Path, listed: list[str] | None) -> None:
        if not file.exists():
            raise CheckpointNotFoundError(
                file,
                f"shard is missing ({INDEX_FILE} places this tensor and {len(listed) - 1} others in it); "
                "download or copy the complete checkpoint",
                tensor=listed[0],
            )
        with _open(file, listed[0] if listed else None) as f:
            present = set(f.keys())
            for name in listed if listed is not None else sorted(present):
                if name not in present:
                    raise CheckpointError(
                        file,
                        f"is named as this tensor's shard by {INDEX_FILE} but does not "
                        "contain it; the index and the shards are from different exports",
                        name,
                    )
                s = f.get_slice(name)
                dtype = s.get_dtype()
                self.infos[name] = TensorInfo(file, tuple(s.get_shape()), DTYPES.get(dtype, dtype))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (rows [r0, r1) of its first dimension when given) in its stored dtype, on CPU."""
        info = self.infos[name]
        with _open(info.file, name) as f:
            try:
                s = f.get_slice(name)
                return s[rows[0] : rows[1]] if rows is not None else s[:]
            except SafetensorError as e:
                raise CheckpointError(
                    info.file, f"cannot be read ({e}); the file is corrupted, download it again", name
                ) from None


class _open:
    """`safe_open` whose failures name the file and the tensor being read."""

    def __init__(self, file: Path, tensor: str | None):
        self.file, self.tensor = file, tensor

    def __enter__(self):
        try:
            self.handle = safe_open(self.file, framework="pt")
        except SafetensorError as e:
            raise CheckpointError(
                self.file,
                f"is not a valid safetensors file ({e}); it is truncated or corrupted, download or copy it again",
                self.tensor,
            ) from None
        except OSError as e:
            raise CheckpointNotFoundError(self.file, f"cannot be opened ({e.strerror})", self.tensor) from None
        return self.handle.__enter__()

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' (10**9, as HF counts) or '500MiB' (2**20)."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if m is None:
        raise ValueError(f"max_shard_size={size!r}: expected a byte count like 5GB, 500MB, 2GiB or 1000000")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    power = " kmgt".index(unit[:1]) if unit else 0
    return int(number * base**power)


class ShardWriter:
    """Packs tensors into shards in `directory`; `finish()` names them and writes the index."""

    def __init__(self, directory: Path, max_shard_size: int | str):
        self.directory, self.max_bytes = Path(directory), parse_size(max_shard_size)
        if self.max_bytes <= 0:
            raise ValueError(f"max_shard_size={max_shard_size!r} must be positive")
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []  # written so far, under temporary names
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} was given twice to the checkpoint writer")
        self.names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self.shards):05d}.partial"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give every shard its final name, write the index when there are several."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            final = self.directory / SINGLE_FILE
            self.shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for k, (path, names) in enumerate(self.shards, start=1):
            final = self.directory / f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files
