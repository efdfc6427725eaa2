"""Saving and resuming a training run: the trainer's side of engine.checkpoint.state.

A run's state is the checkpoint's tensors (engine.checkpoint.train_state) plus JSON: the step, the
skipped-step count and the lr schedule (meta.json), and per rank the data-loader position and the RNG
states (rankNNNNN.json). Resuming at another world size, EP degree or sharding reads the same tensors
into the new layout; the per-rank JSON then comes from rank 0 (the data loader decides whether it can
continue the same global order from it).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import state as ckpt
from . import train_state
from ..errors import ResumeError
from ..optim import fresh_hyperparameters, replan_after_resume, schedule_settings
from .errors import CheckpointError
from .safe_reader import CheckpointCorruptError

log = logging.getLogger("engine")


def rng_state() -> dict:
    """Every RNG the run draws from, as JSON (lists of ints), never a pickle."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                               float(cached)],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict, source: Path) -> None:
    try:
        version, words, gauss = state["python"]
        random.setstate((int(version), tuple(int(w) for w in words), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointCorruptError(source, f"bad RNG state ({type(e).__name__}: {e}); the checkpoint is corrupt, "
                                     "use an earlier one") from None


def save_run(cfg, rt, out: Path, step: int, model, opt, sched, loader, bad_steps: int,
             asynchronous: bool = False, keep: int | None = None):
    """Checkpoint the run after `step` optimizer steps; every rank calls this together. Returns the
    checkpoint's path, or a PendingSave when `asynchronous`."""
    tensors = train_state.collect(model, opt, rt.mesh, copy=asynchronous)
    rank_state = {"rng": rng_state(), "data": loader.state_dict() if hasattr(loader, "state_dict") else None}
    meta = {"world_size": rt.world_size, "ep": rt.mesh.ep, "shard": getattr(cfg.parallel, "shard", "none"),
            "bad_steps": bad_steps, "scheduler": sched.state_dict(), "recipe": cfg.recipe, "config": asdict(cfg),
            "compute_dtype": str(rt.compute_dtype).replace("torch.", ""),
            "schedule": schedule_settings(cfg.optim, cfg.trainer.max_steps)}
    return ckpt.save_checkpoint(out, step, tensors, rank_state, meta, rank=rt.rank, barrier=rt.barrier,
                                keep=keep or cfg.checkpoint.keep, process_group=rt.mesh.ckpt_group,
                                asynchronous=asynchronous)


def _agree(failed: bool, rt) -> bool:
    """True when any rank failed (so that every rank takes the same branch)."""
    if not rt.mesh.distributed:
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=rt.mesh.dp_group)
    return bool(flag.item())


def _say_schedule(cfg, meta: dict, next_lr: float, rt) -> None:
    """Say at startup which schedule keys differ from the checkpoint's: the current ones apply."""
    now = schedule_settings(cfg.optim, cfg.trainer.max_steps)
    saved = meta.get("schedule") or {"optim.lr": lr for lr in meta["scheduler"].get("base_lrs", [])[:1]}
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if changed and rt.is_main:
        log.warning("resume: %s changed since the checkpoint; the schedule is re-planned with the current values "
                    "from step %d on (lr %.3g next), not continued", ", ".join(changed), meta["step"] + 1, next_lr)


def _load(path: Path, cfg, rt, model, opt, sched, loader) -> tuple[int, int]:
    error: CheckpointError | None = None
    try:
        meta = ckpt.read_meta(path)
        mine = ckpt.read_rank_state(path, rt.rank, rt.world_size)
    except CheckpointError as e:
        error = e
    if _agree(error is not None, rt):
        raise error or CheckpointCorruptError(path, "another rank could not read its part (see that rank's log)")
    fresh = fresh_hyperparameters(opt)  # the current config's settings, before the checkpoint's come back
    train_state.restore(path, model, opt, rt.mesh)
    try:
        sched.load_state_dict(meta["scheduler"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorruptError(path / "meta.json", f"bad scheduler state ({type(e).__name__}: {e})") from None
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    _say_schedule(cfg, meta, replan_after_resume(opt, sched, fresh, cfg.optim.lr), rt)
    same_layout = meta["world_size"] == rt.world_size
    source = ckpt.rank_file(path, rt.rank if same_layout else 0)
    if mine.get("data") is not None and hasattr(loader, "load_state_dict"):
        try:
            loader.load_state_dict(mine["data"])
        except ValueError as e:
            raise ResumeError(f"{path}: {e}, or write this run elsewhere with trainer.output_dir=..., or start over "
                              "with trainer.resume=none") from None
    set_rng_state(mine["rng"], source)
    if not same_layout or meta["ep"] != rt.mesh.ep:
        log.info("resharded %s: written by %d ranks (ep %d, shard %s), resumed on %d (ep %d)", path,
                 meta["world_size"], meta["ep"], meta.get("shard"), rt.world_size, rt.mesh.ep)
    log.info("resumed from %s at step %d", path, meta["step"])
    return int(meta["step"]), int(meta.get("bad_steps", 0))


def refuse_finished_run(cfg, out: Path) -> None:
    """Under trainer.resume=auto, an output folder whose newest intact checkpoint is at or past
    trainer.max_steps holds a finished run: refused in one line before anything is built, loaded, planned or
    resumed. A checkpoint that cannot be read is passed over, as the resume itself falls back past it."""
    if cfg.trainer.resume != "auto":
        return
    for path in ckpt.resume_candidates(out, "auto"):
        try:
            step = ckpt.intact_step(path)
        except CheckpointError:
            continue
        if step >= cfg.trainer.max_steps:
            raise CheckpointError(path, f"trainer.output_dir holds a finished run (step {step}, trainer.max_steps="
                                  f"{cfg.trainer.max_steps}): write this run elsewhere with trainer.output_dir=..., "
                                  f"start over in {cfg.trainer.output_dir} with trainer.resume=none, or raise "
                                  "trainer.max_steps to train it further")
        return


def resume_run(cfg, rt, out: Path, model, opt, sched, loader) -> tuple[int, int]:
    """(step, skipped steps) of the checkpoint the run continues from, (0, 0) for a fresh start.
    Under trainer.resume=auto a checkpoint that cannot be read is named and the previous one is used."""
    candidates = ckpt.resume_candidates(out, cfg.trainer.resume)
    for i, path in enumerate(candidates):
        try:
            return _load(path, cfg, rt, model, opt, sched, loader)
        except CheckpointCorruptError as e:
            if cfg.trainer.resume != "auto" or i + 1 == len(candidates):
                raise
            if rt.is_main:
                log.warning("cannot resume from %s (%s); falling back to the previous checkpoint %s", path, e,
                            candidates[i + 1])
    return 0, 0
