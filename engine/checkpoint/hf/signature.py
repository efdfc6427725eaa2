"""The signature of a model checkpoint a training run reads its frozen base from (model.path).

A training checkpoint holds only what was trained (adapters, optimizer state); the frozen base, MXFP4
experts included, is read again from model.path on resume. The signature recorded at save time tells a
resume whether model.path still holds the same base: every weight file's name and size, and a SHA-256 of
config.json and of each file's safetensors header (its tensors' names, dtypes, shapes and offsets) plus
its first and last MiB of data. Cheap at any size (a few MiB read per file), and a re-quantized,
re-exported or different base changes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from engine.checkpoint.hf.safetensors_io import SafetensorsIndex

_SAMPLE = 2**20  # bytes hashed at each end of every weight file


def _file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        digest.update(f.read(min(header_len, size)))
        digest.update(f.read(_SAMPLE))
        f.seek(max(8 + header_len, size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def base_signature(directory: str | Path) -> dict:
    """{'config': sha256 of config.json, 'files': {name: [size, digest]}} of an HF checkpoint directory."""
    directory = Path(directory)
    files = SafetensorsIndex(directory).files
    return {
        "config": hashlib.sha256((directory / "config.json").read_bytes()).hexdigest(),
        "files": {f.name: [f.stat().st_size, _file_digest(f)] for f in files},
    }


def signature_difference(saved: dict, current: dict) -> str | None:
    """What differs between two signatures (one phrase), or None when they match."""
    if saved == current:
        return None
    if saved.get("config") != current.get("config"):
        return "its config.json differs"
    old, new = saved.get("files", {}), current.get("files", {})
    if old.keys() != new.keys():
        return f"its weight files differ ({sorted(old)[:3]} then, {sorted(new)[:3]} now)"
    name = next(n for n in sorted(old) if old[n] != new[n])
    what = "size" if old[name][0] != new[name][0] else "contents"
    return f"{name} has another {what}"
