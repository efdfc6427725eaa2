"""Every folder a run will write, proven writable before step 1: an unwritable `checkpoints/` or export
folder is one line at startup, not a failed save after hours of training."""

from __future__ import annotations

import errno
from pathlib import Path

from engine.errors import StorageError, check_writable


def run_folders(cfg, out: Path) -> dict[Path, str]:
    """The folders the run writes, each with the words that name it in an error."""
    key = f"trainer.output_dir={str(out)!r}"
    folders = {out: "trainer.output_dir", out / "checkpoints": f"{key}: its checkpoints/ folder"}
    export = out / ("adapter" if cfg.peft.method == "lora" else "hf")
    if export.exists():  # replaced by the export at the end: its files must be removable
        folders[export] = f"{key}: its export folder {export.name}/"
    if cfg.trainer.tensorboard:
        folders[out / "tensorboard"] = f"{key}: its tensorboard/ folder (trainer.tensorboard=true)"
    return folders


def check_run_folders(cfg, out: Path) -> None:
    """StorageError naming the first folder of `run_folders` that is not a folder or cannot be written.
    A folder that is absent is created (the export's only at the end, by the export itself)."""
    for folder, what in run_folders(cfg, out).items():
        if folder.exists() and not folder.is_dir():
            raise StorageError(
                errno.ENOTDIR, f"{what}: {folder} is a file, not a folder; move it away or choose another output_dir"
            )
        check_writable(folder, key=what)
