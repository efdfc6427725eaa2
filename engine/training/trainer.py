"""A training run: `run(cfg)` wires the runtime, model, data, optimizer, checkpointer and metrics
together, then calls `train_step` (engine/training/step.py) until trainer.max_steps, and exports.

Each step: this rank's micro-batches -> train_step (forward/backward, gradient sync, clip, NaN guard,
update) -> the lr schedule -> metrics (and validation loss every trainer.val_every steps) -> the
checkpoint policy (engine/training/checkpointer.py) -> samples every trainer.sample_every steps.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ConfigError
from engine.parallel.fsdp import is_sharded
from engine.training.build import arch_of_run, build_loaders, build_model
from engine.training.checkpointer import Checkpointer, export_folder, refuse_finished_run
from engine.training.folders import check_run_folders
from engine.training.memory_plan import check_fits, host_memory, plan_for_run
from engine.training.metrics import MetricsWriter, StepMetrics
from engine.training.optim import build_optimizer, build_scheduler
from engine.training.preempt import PreemptWatch
from engine.training.runtime import Runtime, seed_everything, setup_runtime
from engine.training.samples import build_sampler
from engine.training.step import NonFiniteGuard, train_step
from engine.training.validation import validation_loss

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """What `run` wired, for the loop."""

    cfg: object
    rt: Runtime
    out: Path
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    loader: object  # engine.data.batch.Loader
    val_loader: object  # an iterable of Batch, or None
    checkpointer: Checkpointer
    accum: int


def run(cfg) -> dict:
    if cfg.trainer.dry_run:
        from engine.training.dry_run import dry_run

        return dry_run(cfg)
    out = Path(cfg.trainer.output_dir)
    finished = refuse_finished_run(cfg, out)  # before anything is built, loaded or planned
    if finished is not None:
        return _finish_export(cfg, out, finished)
    check_run_folders(cfg, out)  # an unwritable checkpoints/ or export folder, before step 1
    watch = PreemptWatch(cfg)
    arch = arch_of_run(cfg)
    rt = setup_runtime(cfg, arch)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    _check_memory(cfg, arch, rt)
    model = build_model(cfg, rt, arch)
    model.train()
    opt = build_optimizer(model, cfg.optim, rt.mesh)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    loader, val_loader = build_loaders(cfg, model, rt)
    checkpointer = Checkpointer(cfg, rt, out, model, opt, sched, loader)
    r = _Run(cfg, rt, out, model, opt, sched, loader, val_loader, checkpointer, _accumulation(cfg, rt))
    log.info(
        "model: %s, %.3fM params on this rank (%.3fM trainable), %s on %s, mesh %s, %d micro-batch(es) of %d "
        "per rank per step",
        cfg.model.path or cfg.model.preset,
        model.num_parameters() / 1e6,
        model.num_parameters(trainable_only=True) / 1e6,
        str(rt.param_dtype).replace("torch.", ""),
        rt.device,
        rt.mesh,
        r.accum,
        cfg.data.micro_batch_size,
    )
    start_step, bad_steps = checkpointer.resume()
    watch.install()  # from here on a preemption signal stops the run at a step boundary, with a checkpoint
    try:
        losses, bad_steps, stopped = _train(r, start_step, bad_steps, watch)
        if stopped is not None:
            _stop(r, watch, stopped, r.checkpointer.preempted(stopped, bad_steps))
        final = checkpointer.final(bad_steps)
        if watch.agreed(rt):  # a signal during the final save: the export is left to the rerun
            _stop(r, watch, cfg.trainer.max_steps, final)
    finally:
        watch.restore()  # a signal during the export ends the process as before; the rerun finishes it
    loader.close()
    export_dir = _export(cfg, rt, out, model, final)
    log.info(
        "done: final loss %.4f, checkpoint %s, export %s", losses[-1] if losses else float("nan"), final, export_dir
    )
    rt.mesh.destroy()
    return {"losses": losses, "checkpoint": str(final), "export": str(export_dir) if export_dir else None}


def _train(r: _Run, start_step: int, bad_steps: int, watch: PreemptWatch) -> tuple[list[float], int, int | None]:
    """The steps from `start_step` to trainer.max_steps; (their losses, the skipped-step count, the step
    after which a preemption stopped them or None)."""
    cfg, rt, max_steps = r.cfg, r.rt, r.cfg.trainer.max_steps
    writer = MetricsWriter(r.out, rt.is_main, cfg.trainer.tensorboard, start_step=start_step)
    metrics, guard = StepMetrics(cfg, rt, r.model, r.accum), NonFiniteGuard(cfg.trainer.max_bad_steps, bad_steps)
    progress, sampler = _progress(cfg, rt, start_step), build_sampler(cfg, rt, r.out)
    # What the data preparation kept, skipped and dropped goes into the first metrics line.
    data_report = {**r.loader.report, **(r.val_loader.report if r.val_loader is not None else {})}
    losses: list[float] = []
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        result = train_step(r.model, [next(r.loader) for _ in range(r.accum)], r.opt, rt, cfg.optim.grad_clip)
        lr = r.sched.get_last_lr()[0]
        guard.check(step, result, r.checkpointer.last_good, log)
        r.sched.step()  # the schedule keeps its step count through skipped steps
        losses.append(result.loss)
        record = metrics.record(step, result, lr, time.perf_counter() - t0, guard.bad_steps)
        if r.val_loader is not None and (step % cfg.trainer.val_every == 0 or step == max_steps):
            record["val_loss"] = validation_loss(r.model, r.val_loader, rt)
        held = r.checkpointer.after_step(step, guard.bad_steps)
        if held is not None:
            record["checkpoint_s"] = held  # what the save held the training thread
        if step % cfg.trainer.log_every == 0 or step == max_steps:
            writer.write({**record, **data_report})
            data_report = {}
        progress(record)
        if sampler is not None and step % cfg.trainer.sample_every == 0:
            sampler(r.model, step)
        if watch.agreed(rt):  # every rank stops after the same step
            return losses, guard.bad_steps, step
    return losses, guard.bad_steps, None


def _stop(r: _Run, watch: PreemptWatch, step: int, path: Path) -> None:
    """After a preemption, checkpoint `path` at `step` saved: one line, and Preempted raised (the export,
    when the run is finished, is left to the rerun)."""
    watch.done()
    r.loader.close()
    stop = watch.stopped(r.rt, step, path)
    r.rt.mesh.destroy()
    raise stop


def _check_memory(cfg, arch, rt: Runtime) -> None:
    """The memory plan per rank, logged; a plan over the GPU's memory is refused (trainer.memory_check)."""
    plan = plan_for_run(cfg, arch, rt.device.type, rt.world_size)
    log.info(
        "memory plan per %s (estimate; %d ranks, ep %d x expert-dp %d, parallel.shard=%s):\n%s",
        "GPU" if rt.device.type == "cuda" else "process",
        rt.world_size,
        rt.mesh.ep,
        rt.mesh.edp_size,
        cfg.parallel.shard,
        plan.format(),
    )
    on_gpu = rt.device.type == "cuda"
    capacity = torch.cuda.get_device_properties(rt.device).total_memory if on_gpu else host_memory()
    check_fits(plan, capacity, cfg.trainer.memory_check, "GPU" if on_gpu else "CPU")
    if on_gpu:
        log.info("memory plan %.1f GiB of this GPU's %.1f GiB: fits", plan.total / 2**30, capacity / 2**30)


def _accumulation(cfg, rt: Runtime) -> int:
    data_ranks = rt.mesh.data_size  # world / parallel.cp: the ranks of a CP group share their rows
    try:
        return cfg.data.grad_accum_steps(data_ranks)
    except ValueError as e:
        raise ConfigError(
            f"{e}; adjust data.micro_batch_size or data.global_batch_size for {data_ranks} data ranks "
            f"({rt.world_size} ranks / parallel.cp={rt.mesh.cp})"
        ) from None


def _export(cfg, rt: Runtime, out: Path, model, final: Path) -> Path | None:
    """LoRA: a PEFT adapter in out/adapter; full training: an HF checkpoint in out/hf. Rank 0 writes
    it; under expert parallelism or FSDP it rebuilds the whole model from the final checkpoint."""
    if not rt.is_main:
        return None
    from engine.export import export, write_export

    lora = cfg.peft.method == "lora"
    target = export_folder(cfg, out)
    dtype = "fp32" if rt.compute_dtype == torch.float32 else "bf16"  # the run's own dtype
    if rt.mesh.ep > 1 or is_sharded(model):  # rank 0 does not hold the whole model: read it back
        return export(final, target, dtype=dtype, overwrite=True)
    return write_export(cfg, model, target, "peft" if lora else "hf", dtype=dtype, overwrite=True)


def _finish_export(cfg, out: Path, final: Path) -> dict:
    """A finished run whose export was interrupted (killed while writing it): rank 0 writes the export from
    the final checkpoint (removing the folders the killed export left); nothing trains."""
    if os.environ.get("RANK", "0") != "0":
        return {"losses": [], "checkpoint": str(final), "export": None}
    from engine.export import export

    target = export_folder(cfg, out)
    log.info("%s is finished but its export %s was never completed: exporting it now", final, target)
    written = export(final, target, overwrite=True)  # in the run's dtype, as at the end of training
    log.info("done: checkpoint %s, export %s", final, written)
    return {"losses": [], "checkpoint": str(final), "export": str(written)}


def _progress(cfg, rt: Runtime, start_step: int):
    """Rank 0: a tqdm bar (loss, tokens/s, ETA) on a terminal; log lines every log_every otherwise."""
    total = cfg.trainer.max_steps
    t_start = time.perf_counter()
    if rt.is_main and cfg.trainer.progress and sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

        def update(record: dict) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if record["step"] == total:
                bar.close()

        return update

    def show(record: dict) -> None:
        step = record["step"]
        if not rt.is_main or not (step % cfg.trainer.log_every == 0 or step == total):
            return
        eta = (time.perf_counter() - t_start) / max(step - start_step, 1) * (total - step)
        val = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        log.info(
            "step %d/%d  loss %.4f%s  lr %.2e  grad_norm %.3f  tok/s %.0f  eta %.0fs",
            step,
            total,
            record["loss"],
            val,
            record["lr"],
            record["grad_norm"],
            record["tokens_per_s"],
            eta,
        )

    return show
