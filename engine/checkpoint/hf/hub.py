"""Turn `model.path` (a local directory or a Hugging Face hub id) into a local checkpoint directory.

Hub ids go through huggingface_hub's `snapshot_download`, so its cache, HF_TOKEN (gated and private
repositories) and HF_HUB_OFFLINE apply. Only top-level weights, configs and tokenizer files are
fetched: the published gpt-oss repositories also carry `original/` and `metal/` copies of the
weights that this engine does not read and that would double the download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine.checkpoint.errors import CheckpointError, CheckpointNotFoundError

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja"]
IGNORE_PATTERNS = ["*/*"]  # top level only
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later setting counts too.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_checkpoint(path: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (or found in the cache)."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointNotFoundError(local, "is a file; pass the checkpoint directory (the one with config.json)")
        return local
    if not _REPO_ID.match(str(path)):
        raise CheckpointNotFoundError(local, "no such directory, and not a hub id of the form 'org/name'")
    return _download(str(path), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    where = "not a local directory, so looked up on the Hugging Face hub"
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                local_files_only=offline,
            )
        )
    except GatedRepoError:
        raise CheckpointNotFoundError(
            repo_id, f"{where}: the repository is gated; accept its license on huggingface.co and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            repo_id,
            f"{where}: no such repository (or it is private: set HF_TOKEN); check the spelling or the local path",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(repo_id, f"{where}: revision {revision!r} does not exist") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointNotFoundError(
            repo_id,
            f"{where}: {reason} and the cache has no copy of it. Download it where there is network "
            f"(`hf download {repo_id}`) and copy the cache or the directory here, or fix the local path",
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(repo_id, f"{where}: the hub answered with an error: {e}") from None
