"""The training loop: wires config, mesh, model, data, optimizer, checkpoints and metrics together.

One optimizer step:
  1. draw this rank's micro-batches of the global batch (the global batch is fixed by the recipe,
     whatever the world size; gradient accumulation makes up the difference)
  2. count the target tokens of the WHOLE global batch (all ranks; under parallel.cp the ranks of a CP
     group read the same rows, so each row is counted once): each micro-batch's summed loss is
     divided by that count, so the accumulated gradient is exactly d(mean token loss) of the global
     batch, independent of how tokens fall on ranks and micro-batches
  3. backward per micro-batch; gradients SUMMED across ranks (dense over all ranks, experts over
     their expert-data-parallel group); global-norm clip; NaN guard; AdamW step
  4. log, checkpoint every N steps (torch.distributed.checkpoint: atomic, reshardable, optionally
     written in the background), export at the end
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .build import Runtime, build_loaders, build_model, seed_everything, setup_runtime
from .checkpoint import state as ckpt
from .checkpoint.run_state import refuse_finished_run, resume_run, save_run
from .config import TrainConfig
from .errors import ConfigError, DivergenceError
from .evaluate import validation_loss
from .memory_plan import arch_of_run, check_fits, plan_for_run
from .metrics import MetricsWriter, active_lora_params, expert_load, flops_per_token, peak_flops, peak_memory_gb
from .optim import build_optimizer, build_scheduler
from .sampling import build_sampler
from .parallel import clip_grad_norm, global_token_count, sync_gradients
from .parallel.fsdp import clip_sharded, is_sharded

log = logging.getLogger("engine")


def _model_inputs(b: dict, device: torch.device) -> dict:
    return {"input_ids": b["input_ids"].to(device), "labels": b["labels"].to(device),
            "position_ids": b["position_ids"].to(device),
            "doc_ids": None if b.get("doc_ids") is None else b["doc_ids"].to(device)}


def _all_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.mesh.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=rt.mesh.dp_group)
    return t


def run(cfg: TrainConfig) -> dict:
    if cfg.trainer.dry_run:
        from .dry_run import dry_run

        return dry_run(cfg)
    out = Path(cfg.trainer.output_dir)
    refuse_finished_run(cfg, out)  # before anything is built, loaded or planned
    arch = arch_of_run(cfg)
    rt = setup_runtime(cfg, arch)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    plan = plan_for_run(cfg, arch, rt.device.type, rt.world_size)
    log.info("memory plan per %s (estimate; %d ranks, ep %d x expert-dp %d, parallel.shard=%s):\n%s",
             "GPU" if rt.device.type == "cuda" else "process", rt.world_size, rt.mesh.ep, rt.mesh.edp_size,
             cfg.parallel.shard, plan.format())
    capacity = torch.cuda.get_device_properties(rt.device).total_memory if rt.device.type == "cuda" else None
    check_fits(plan, capacity, cfg.trainer.memory_check)
    if capacity:
        log.info("memory plan %.1f GiB of this GPU's %.1f GiB: fits", plan.total / 2**30, capacity / 2**30)

    model = build_model(cfg, rt, arch)
    model.train()
    opt = build_optimizer(model, cfg.optim, rt.mesh)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    loader, val_loader = build_loaders(cfg, model, rt)
    data_ranks = rt.mesh.data_size  # world / parallel.cp: the ranks of a CP group share their rows
    try:
        accum = cfg.data.grad_accum_steps(data_ranks)
    except ValueError as e:
        raise ConfigError(f"{e}; adjust data.micro_batch_size or data.global_batch_size for {data_ranks} data ranks "
                          f"({rt.world_size} ranks / parallel.cp={rt.mesh.cp})") from None
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s, %.3fM params on this rank (%.3fM trainable), %s on %s, mesh %s, %d micro-batch(es) of %d "
             "per rank per step", cfg.model.path or cfg.model.preset, model.num_parameters() / 1e6, n_trainable / 1e6,
             str(rt.param_dtype).replace("torch.", ""), rt.device, rt.mesh, accum, cfg.data.micro_batch_size)

    if rt.is_main:
        for debris in ckpt.remove_debris(out):
            log.info("removed %s, left by an interrupted save", debris)
    rt.barrier()
    start_step, bad_steps = resume_run(cfg, rt, out, model, opt, sched, loader)
    pending = None  # a checkpoint being written in the background (checkpoint.async_)

    writer = MetricsWriter(out, rt.is_main, cfg.trainer.tensorboard, start_step=start_step)
    # NaN guard bookkeeping: a checkpoint whose interval had skipped steps is not saved (it would push
    # good ones out); `last_good` is the newest checkpoint without any.
    last_good = ckpt.step_dir(out, start_step) if start_step else None
    bad_at_boundary = bad_steps
    peak = peak_flops(rt.device)
    lora_params = active_lora_params(model.config, cfg.peft.rank, list(cfg.peft.target_modules),
                                     cfg.peft.share_expert_adapters) if cfg.peft.method == "lora" else 0
    fpt = flops_per_token(model.config, cfg.data.max_seq_len, lora_params)
    losses: list[float] = []
    progress = _progress(cfg, rt, start_step)
    sampler = build_sampler(cfg, rt, out)
    # What the data preparation kept, skipped and dropped goes into the first metrics line.
    data_report = {**getattr(loader, "report", {}), **getattr(val_loader, "report", {})}
    for step in range(start_step, cfg.trainer.max_steps):
        t0 = time.perf_counter()
        batches = [next(loader) for _ in range(accum)]
        # Summed over the world, a CP group's shared rows count cp times: divided back (exact).
        n_target = global_token_count(sum(int(b["num_target_tokens"]) for b in batches), rt.mesh) // rt.mesh.cp
        normalizer = n_target.clamp(min=1).to(torch.float32)
        loss_total = torch.zeros((), device=rt.device)
        for b in batches:
            with rt.autocast():
                loss = model(**_model_inputs(b, rt.device), loss_normalizer=normalizer, cp=rt.cp)
            loss.backward()
            loss_total += loss.detach().float()
        if is_sharded(model):  # FSDP2 reduced the gradients in the backward
            grad_norm = float(clip_sharded(model, rt.mesh, cfg.optim.grad_clip))
        else:
            sync_gradients(model, rt.mesh)
            grad_norm = float(clip_grad_norm(model, rt.mesh, cfg.optim.grad_clip))
        loss_value = float(_all_sum(loss_total, rt))  # the global batch's mean token loss
        lr = sched.get_last_lr()[0]
        if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
            # NaN/inf guard: drop this update (every rank sees the same global values), keep the
            # schedule on its step count, stop when it keeps happening.
            bad_steps += 1
            log.warning("step %d: non-finite loss/gradient (loss %s, grad_norm %s); update skipped (%d/%d allowed)",
                        step + 1, loss_value, grad_norm, bad_steps, cfg.trainer.max_bad_steps)
            if bad_steps > cfg.trainer.max_bad_steps:
                where = (f"the last checkpoint saved without skipped steps is {last_good}: resume from it "
                         f"(trainer.resume={last_good})" if last_good else "no checkpoint was saved")
                raise DivergenceError(f"stopped at step {step + 1}: {bad_steps} steps with non-finite loss or "
                                      f"gradients, more than trainer.max_bad_steps={cfg.trainer.max_bad_steps}; "
                                      f"nothing was saved after them; {where} with a lower optim.lr, or check the data")
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss_value)
        n_tokens = accum * cfg.data.micro_batch_size * cfg.data.max_seq_len * data_ranks
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": n_tokens / dt, "step_time_s": dt, "target_tokens": int(n_target),
                  "skipped_steps": bad_steps}
        if peak:
            record["mfu"] = record["tokens_per_s"] * fpt / (peak * rt.world_size)
        mem = peak_memory_gb(rt.device)
        if mem is not None:
            record["peak_memory_gb"] = mem
        record.update(expert_load(model, rt.mesh))
        if val_loader is not None and ((step + 1) % cfg.trainer.val_every == 0 or step + 1 == cfg.trainer.max_steps):
            record["val_loss"] = validation_loss(model, val_loader, rt)
        if pending is not None:
            pending.poll()
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.trainer.max_steps:
            if bad_steps > bad_at_boundary:
                log.warning("step %d: checkpoint not saved: %d step(s) since the last checkpoint step were skipped "
                            "as non-finite; the last good checkpoint stays %s", step + 1, bad_steps - bad_at_boundary,
                            last_good or "none")
            else:
                t_save = time.perf_counter()
                if pending is not None:
                    pending.wait()
                pending = save_run(cfg, rt, out, step + 1, model, opt, sched, loader, bad_steps,
                                   asynchronous=cfg.checkpoint.async_)
                if not cfg.checkpoint.async_:
                    pending = None
                last_good = ckpt.step_dir(out, step + 1)
                record["checkpoint_s"] = time.perf_counter() - t_save  # what the save held the training thread
            bad_at_boundary = bad_steps
        if (step + 1) % cfg.trainer.log_every == 0 or step + 1 == cfg.trainer.max_steps:
            writer.write({**record, **data_report})
            data_report = {}
        progress(record)
        if sampler is not None and (step + 1) % cfg.trainer.sample_every == 0:
            sampler(model, step + 1)
    if pending is not None:
        pending.wait()
    dirty = bad_steps > bad_at_boundary
    # A final state reached through skipped steps is still saved (the export needs it), said so, and
    # never pushes the last good checkpoint out.
    final = save_run(cfg, rt, out, cfg.trainer.max_steps, model, opt, sched, loader, bad_steps,
                     keep=cfg.checkpoint.keep + dirty)
    if dirty:
        log.warning("final checkpoint %s follows %d skipped non-finite step(s); the last checkpoint without any "
                    "is %s", final, bad_steps - bad_at_boundary, last_good or "none (none was saved)")
    if hasattr(loader, "close"):
        loader.close()
    export_dir = _export(cfg, rt, out, model, final)
    log.info("done: final loss %.4f, checkpoint %s, export %s", losses[-1] if losses else float("nan"), final,
             export_dir)
    rt.mesh.destroy()
    return {"losses": losses, "checkpoint": str(final), "export": str(export_dir) if export_dir else None}




def _export(cfg: TrainConfig, rt: Runtime, out: Path, model, final: Path) -> Path | None:
    """LoRA: a PEFT adapter in out/adapter; full training: an HF checkpoint in out/hf. Rank 0 writes
    it; under expert parallelism or FSDP it rebuilds the whole model from the final checkpoint."""
    if not rt.is_main:
        return None
    from .export import export, write_export

    lora = cfg.peft.method == "lora"
    target = out / ("adapter" if lora else "hf")
    dtype = "fp32" if rt.compute_dtype == torch.float32 else "bf16"  # the run's own dtype
    if rt.mesh.ep > 1 or is_sharded(model):  # rank 0 does not hold the whole model: read it back
        return export(final, target, dtype=dtype, overwrite=True)
    return write_export(cfg, model, target, "peft" if lora else "hf", dtype=dtype, overwrite=True)


def _progress(cfg: TrainConfig, rt: Runtime, start_step: int):
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
        log.info("step %d/%d  loss %.4f%s  lr %.2e  grad_norm %.3f  tok/s %.0f  eta %.0fs", step, total,
                 record["loss"], val, record["lr"], record["grad_norm"], record["tokens_per_s"], eta)

    return show
