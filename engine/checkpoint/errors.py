"""Errors a user can cause with a checkpoint: each message names the file and, where there is one, the
tensor, and says what to do. Both are ValueError / FileNotFoundError subclasses so callers that only
know the builtins still catch them."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as GPT-OSS: bad layout, shape, dtype, header or quantization."""

    def __init__(self, file: str | Path | None, message: str, tensor: str | None = None):
        where = str(file) if file is not None else "checkpoint"
        if tensor is not None:
            where += f": tensor {tensor!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.tensor = file, tensor


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory, shard file or hub repository that is not there."""


class CheckpointExistsError(FileExistsError):
    """An export target that already holds files (pass overwrite=True to replace it)."""
