"""Training checkpoints for exact resume: complete or absent, never half.

Layout: OUTPUT/checkpoints/step_0000040/{meta.json, rank00000.pt, rank00001.pt, ...}
Each rank writes its own file (its experts, its optimizer shard) into a hidden temporary folder;
rank 0 writes meta.json last and renames the folder into place. A crash at any point leaves either
the previous checkpoints untouched and no new one, or the new one complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

STEP_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"{STEP_PREFIX}{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def save_checkpoint(output_dir: str | Path, step: int, payload: dict, *, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] = lambda: None, keep: int = 2, extra_meta: dict | None = None) -> Path:
    root = checkpoints_root(output_dir)
    final = step_dir(output_dir, step)
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier crashed save
        tmp.mkdir()
    barrier()
    part = tmp / f"rank{rank:05d}.pt"
    with open(part.with_suffix(".pt.partial"), "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part.with_suffix(".pt.partial"), part)
    barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world_size, **(extra_meta or {})}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
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
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """`auto`: newest complete checkpoint of this run, if any; `none`: start fresh; else a checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such checkpoint directory")
    if not is_complete(path):
        raise FileNotFoundError(f"trainer.resume={resume!r}: checkpoint is incomplete (no meta.json); "
                                "it was interrupted while saving, pick an earlier one")
    return path


def load_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise ValueError(f"{path}: saved with {meta['world_size']} ranks, resuming with {world_size}; "
                         "resume with the same number of ranks and parallel.ep")
    return torch.load(path / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)
