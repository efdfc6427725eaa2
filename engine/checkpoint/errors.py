"""Errors a user can cause with a checkpoint: each message names the file and, where there is one, the
tensor, and says what to do. Both are ValueError / FileNotFoundError subclasses so callers that only
know the builtins still catch them."""

from __future__ import annotations

from engine.errors import CheckpointError  # noqa: F401  (one class for every checkpoint error)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory, shard file or hub repository that is not there."""


class CheckpointExistsError(FileExistsError):
    """An export target that already holds files (pass overwrite=True to replace it)."""
