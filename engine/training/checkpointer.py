"""Saving and resuming a training run: the `Checkpointer` owns the policy (when to save, which checkpoint
is good, resuming) and the state it saves, over engine.checkpoint.dcp (folders, atomic and async saves).

A run's state is the checkpoint's tensors (engine.checkpoint.dcp.train_state) plus JSON: the step, the
skipped-step count and the lr schedule (meta.json), and per rank the data-loader position and the RNG
states (rankNNNNN.json). Resuming at another world size, EP degree or sharding reads the same tensors
into the new layout; the per-rank JSON then comes from rank 0 (the data loader decides whether it can
continue the same global order from it).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint.dcp import fields, train_state
from engine.checkpoint.dcp import state as ckpt
from engine.checkpoint.dcp.safe_reader import CheckpointCorruptError
from engine.checkpoint.errors import CheckpointError
from engine.errors import ResumeError
from engine.parallel.comm import any_rank
from engine.training.optim import fresh_hyperparameters, replan_after_resume, schedule_settings

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """Every RNG the run draws from, as JSON (lists of ints), never a pickle."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
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
        raise CheckpointCorruptError(
            source, f"bad RNG state ({type(e).__name__}: {e}); the checkpoint is corrupt, use an earlier one"
        ) from None


def _say_schedule(cfg, meta: dict, next_lr: float, rt) -> None:
    """Say at startup which schedule keys differ from the checkpoint's: the current ones apply."""
    now = schedule_settings(cfg.optim, cfg.trainer.max_steps)
    saved = meta.get("schedule") or {"optim.lr": lr for lr in meta["scheduler"].get("base_lrs", [])[:1]}
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if changed and rt.is_main:
        log.warning(
            "resume: %s changed since the checkpoint; the schedule is re-planned with the current values "
            "from step %d on (lr %.3g next), not continued",
            ", ".join(changed),
            meta["step"] + 1,
            next_lr,
        )


def _load(path: Path, cfg, rt, model, opt, sched, loader) -> tuple[int, int]:
    error: CheckpointError | None = None
    try:  # every field of the JSON checked, and this rank's share of the files against their sha256
        meta, mine = fields.read_for_resume(path, rt.rank, rt.world_size, cfg.checkpoint.verify)
    except CheckpointError as e:
        error = e
        if not rt.is_main:  # rank 0 names only its own part
            log.warning("rank %d cannot resume from %s: %s", rt.rank, path, e)
    if any_rank(error is not None, rt.mesh.dp_group if rt.mesh.distributed else None, rt.device):
        raise error or CheckpointCorruptError(path, "another rank could not read its part (see that rank's log)")
    check_base(path, meta, cfg)
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
    if mine.get("data") is not None:
        try:
            loader.load_state_dict(mine["data"])
        except ValueError as e:
            raise ResumeError(
                f"{path}: {e}, or write this run elsewhere with trainer.output_dir=..., or start over "
                "with trainer.resume=none"
            ) from None
    set_rng_state(mine["rng"], source)
    if not same_layout or meta["ep"] != rt.mesh.ep:
        log.info(
            "resharded %s: written by %d ranks (ep %d, shard %s), resumed on %d (ep %d)",
            path,
            meta["world_size"],
            meta["ep"],
            meta.get("shard"),
            rt.world_size,
            rt.mesh.ep,
        )
    log.info("resumed from %s at step %d", path, meta["step"])
    return int(meta["step"]), int(meta.get("bad_steps", 0))


def export_folder(cfg, out: Path) -> Path:
    """Where a run's export goes: out/adapter (LoRA) or out/hf."""
    return out / ("adapter" if cfg.peft.method == "lora" else "hf")


def frozen_base(cfg) -> Path | None:
    """The checkpoint directory a LoRA run's frozen base is read from (not saved in its checkpoints)."""
    if cfg.peft.method != "lora" or not cfg.model.path:
        return None
    from engine.checkpoint.hf.hub import resolve_checkpoint

    return resolve_checkpoint(cfg.model.path)


def check_base(path: Path, meta: dict, cfg) -> None:
    """Refuse to put adapters on another base than the one they were trained on."""
    saved = meta.get("base_signature")
    base = frozen_base(cfg) if saved else None
    if base is None:
        return
    from engine.checkpoint.hf.signature import base_signature, signature_difference

    diff = signature_difference(saved, base_signature(base))
    if diff:
        raise ResumeError(
            f"{path} was trained on another base than model.path={cfg.model.path} ({diff}); the checkpoint holds "
            "only the adapters, read again over that base on resume: point model.path at the base it was trained "
            "on, or start over with trainer.resume=none"
        )


def refuse_finished_run(cfg, out: Path) -> Path | None:
    """Under trainer.resume=auto, an output folder whose newest intact checkpoint is at or past
    trainer.max_steps holds a finished run: refused in one line before anything is built, loaded, planned or
    resumed. A checkpoint that cannot be read is passed over, as the resume itself falls back past it.
    A finished run without its export (killed while exporting) is not refused: its final checkpoint is
    returned, for the caller to finish the export."""
    if cfg.trainer.resume != "auto":
        return None
    for path in ckpt.resume_candidates(out, "auto"):
        try:
            step = fields.intact_step(path)
        except CheckpointError:
            continue
        if step >= cfg.trainer.max_steps:
            if not export_folder(cfg, out).exists():
                return path
            raise CheckpointError(
                path,
                f"trainer.output_dir holds a finished run (step {step}, trainer.max_steps="
                f"{cfg.trainer.max_steps}): write this run elsewhere with trainer.output_dir=..., "
                f"start over in {cfg.trainer.output_dir} with trainer.resume=none, or raise "
                "trainer.max_steps to train it further",
            )
        return None
    return None


def resume_run(cfg, rt, out: Path, model, opt, sched, loader) -> tuple[int, int]:
    """(step, skipped steps) of the checkpoint the run continues from, (0, 0) for a fresh start.
    Under trainer.resume=auto a checkpoint that cannot be read is named and the previous one is used."""
    candidates = ckpt.resume_candidates(out, cfg.trainer.resume)
    if cfg.trainer.resume == "auto" and rt.is_main:
        for skipped in ckpt.incomplete_checkpoints(out):
            log.warning("skipping %s: it has no meta.json (an interrupted or damaged save); not resumed from", skipped)
    for i, path in enumerate(candidates):
        try:
            return _load(path, cfg, rt, model, opt, sched, loader)
        except CheckpointCorruptError as e:
            if cfg.trainer.resume != "auto" or i + 1 == len(candidates):
                raise
            if rt.is_main:
                log.warning(
                    "cannot resume from %s (%s); falling back to the previous checkpoint %s", path, e, candidates[i + 1]
                )
    return 0, 0


class Checkpointer:
    """A run's checkpoints: every checkpoint.every steps and at the end, keeping checkpoint.keep, written in
    the background with checkpoint.async; resuming; and the NaN guard's bookkeeping: a checkpoint whose
    interval had skipped steps is not saved (it would push good ones out), `last_good` is the newest one
    without any. Every rank calls every method together."""

    def __init__(self, cfg, rt, out: Path, model, opt, sched, loader):
        self.cfg, self.rt, self.out = cfg, rt, out
        self.model, self.opt, self.sched, self.loader = model, opt, sched, loader  # what a checkpoint holds
        self.pending = None  # a checkpoint being written in the background
        self.last_good: Path | None = None
        self.bad_at_boundary = 0  # skipped steps counted at the last checkpoint step
        self._base_signature = None  # of model.path, computed at the first save (LoRA runs)

    def resume(self) -> tuple[int, int]:
        """Remove the debris of interrupted saves, then (step, skipped steps) of the checkpoint the run
        continues from, (0, 0) for a fresh start."""
        if self.rt.is_main:
            for debris in ckpt.remove_debris(self.out):
                log.info("removed %s, left by an interrupted save", debris)
        self.rt.barrier()
        step, bad_steps = resume_run(self.cfg, self.rt, self.out, self.model, self.opt, self.sched, self.loader)
        self.last_good = ckpt.step_dir(self.out, step) if step else None
        self.bad_at_boundary = bad_steps
        return step, bad_steps

    def save(self, step: int, bad_steps: int, asynchronous: bool = False, keep: int | None = None):
        """Checkpoint the run after `step` optimizer steps. Returns the checkpoint's path, or a PendingSave
        when `asynchronous`."""
        cfg, rt = self.cfg, self.rt
        tensors = train_state.collect(self.model, self.opt, rt.mesh, copy=asynchronous)
        rank_state = {"rng": rng_state(), "data": self.loader.state_dict()}
        meta = {
            "world_size": rt.world_size,
            "ep": rt.mesh.ep,
            "shard": cfg.parallel.shard,
            "bad_steps": bad_steps,
            "scheduler": self.sched.state_dict(),
            "recipe": cfg.recipe,
            "config": asdict(cfg),
            "compute_dtype": str(rt.compute_dtype).replace("torch.", ""),
            "schedule": schedule_settings(cfg.optim, cfg.trainer.max_steps),
        }
        base = frozen_base(cfg)
        if base is not None:
            if self._base_signature is None:
                from engine.checkpoint.hf.signature import base_signature

                self._base_signature = base_signature(base)
            meta["base_signature"] = self._base_signature
        return ckpt.save_checkpoint(
            self.out,
            step,
            tensors,
            rank_state,
            meta,
            rank=rt.rank,
            barrier=rt.barrier,
            keep=keep or cfg.checkpoint.keep,
            process_group=rt.mesh.ckpt_group,
            asynchronous=asynchronous,
            checksums=cfg.checkpoint.verify,
        )

    def after_step(self, step: int, bad_steps: int) -> float | None:
        """The periodic checkpoint, when `step` is one; returns the seconds it held the training thread."""
        if self.pending is not None:
            self.pending.poll()
        every = self.cfg.checkpoint.every
        if not every or step % every or step >= self.cfg.trainer.max_steps:
            return None
        held = None
        if bad_steps > self.bad_at_boundary:
            log.warning(
                "step %d: checkpoint not saved: %d step(s) since the last checkpoint step were skipped as "
                "non-finite; the last good checkpoint stays %s",
                step,
                bad_steps - self.bad_at_boundary,
                self.last_good or "none",
            )
        else:
            t0 = time.perf_counter()
            if self.pending is not None:
                self.pending.wait()
            asynchronous = self.cfg.checkpoint.async_
            saved = self.save(step, bad_steps, asynchronous=asynchronous)
            self.pending = saved if asynchronous else None
            self.last_good = ckpt.step_dir(self.out, step)
            held = time.perf_counter() - t0
        self.bad_at_boundary = bad_steps
        return held

    def preempted(self, step: int, bad_steps: int) -> Path:
        """The checkpoint of a run preempted after `step`, the save in flight completed first: this step's
        periodic checkpoint when it has one, else one saved now (kept beside the last good one if dirty)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        if self.last_good == ckpt.step_dir(self.out, step):
            return self.last_good
        dirty = bad_steps > self.bad_at_boundary
        return self.save(step, bad_steps, keep=self.cfg.checkpoint.keep + dirty)

    def final(self, bad_steps: int) -> Path:
        """The last checkpoint, at trainer.max_steps. One reached through skipped steps is still saved (the
        export needs it), said so, and never pushes the last good checkpoint out."""
        if self.pending is not None:
            self.pending.wait()
        dirty = bad_steps > self.bad_at_boundary
        final = self.save(self.cfg.trainer.max_steps, bad_steps, keep=self.cfg.checkpoint.keep + dirty)
        if dirty:
            log.warning(
                "final checkpoint %s follows %d skipped non-finite step(s); the last checkpoint without any is %s",
                final,
                bad_steps - self.bad_at_boundary,
                self.last_good or "none (none was saved)",
            )
        return final
