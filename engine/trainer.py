"""The training loop: wires config, model, data, optimizer, checkpoints and metrics together.

One optimizer step:
  1. draw this rank's micro-batches of the global batch (the global batch is fixed by the recipe,
     whatever the world size; gradient accumulation makes up the difference)
  2. count the target tokens of the WHOLE global batch (all ranks): each micro-batch's summed loss is
     divided by that count, so the accumulated gradient is exactly d(mean token loss) of the global
     batch, independent of how tokens fall on ranks and micro-batches
  3. backward per micro-batch, gradient sync across ranks, global-norm clip, NaN guard, AdamW step
  4. log, checkpoint every N steps (atomic), export at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import state as ckpt
from .config import TrainConfig
from .metrics import MetricsWriter, expert_load, flops_per_token, peak_flops, peak_memory_gb
from .models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from .optim import build_optimizer, build_scheduler
from .peft.config import LoraConfig
from .synthetic import SyntheticLoader

log = logging.getLogger("engine")


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    param_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()


def setup_runtime(cfg: TrainConfig) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 or cfg.parallel.ep > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        raise NotImplementedError(
            f"multi-rank training (WORLD_SIZE={world}, parallel.ep={cfg.parallel.ep}) is not available in this "
            "build; run single-process with parallel.ep=1")
    want = cfg.trainer.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    device = torch.device(want, int(os.environ.get("LOCAL_RANK", "0"))) if want == "cuda" else torch.device("cpu")
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    compute = getattr(torch, dtype)
    # Full training keeps fp32 master weights and computes in bf16 under autocast; LoRA keeps the
    # frozen base in the compute dtype (its adapters in fp32, see build_model).
    param = torch.float32 if cfg.peft.method == "none" else compute
    return Runtime(rank, world, device, param, compute)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, rt: Runtime) -> GptOssForCausalLM:
    opts = ModelOptions(experts_backend=cfg.model.experts_backend, attn_backend=cfg.model.attn_backend,
                        ce_chunk_size=cfg.model.ce_chunk_size)
    if cfg.model.path:
        from .checkpoint.hf import load_hf

        model = load_hf(cfg.model.path, dtype=rt.param_dtype, device=rt.device, options=opts,
                        progress=rt.is_main)
    else:
        arch = GptOssConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
        with torch.device("meta"):
            model = GptOssForCausalLM(arch, opts)
        model.to_empty(device=rt.device)
        model.init_weights(seed=cfg.trainer.seed)
        model.to(rt.param_dtype)
    if cfg.model.activation_checkpointing:
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    if cfg.peft.method == "lora":
        from .peft import apply_lora, format_report

        lora_cfg = LoraConfig(**{f.name: getattr(cfg.peft, f.name) for f in dataclasses.fields(LoraConfig)})
        report = apply_lora(model, lora_cfg, seed=cfg.trainer.seed)
        # Adapters are tiny: keep them (and so AdamW's state) in fp32; autocast computes in bf16.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if rt.is_main:
            log.info("LoRA adapters:\n%s", format_report(report))
    return model


def resolve_tokenizer_path(cfg: TrainConfig) -> str | None:
    """data.tokenizer if set; else the model checkpoint's tokenizer.json; else the shipped one (None)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").is_file():
        return cfg.model.path
    return None


def build_loaders(cfg: TrainConfig, model: GptOssForCausalLM, rt: Runtime):
    """(train loader, validation loader or None) for this rank."""
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticLoader(model.config.vocab_size, d.max_seq_len, d.micro_batch_size, cfg.trainer.seed,
                               rt.rank, rt.world_size), None
    from .data import build_train_loader, build_val_loader, load_tokenizer

    tok = load_tokenizer(resolve_tokenizer_path(cfg))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; use the model's own tokenizer (data.tokenizer=...)")
    train = build_train_loader(d, tok, rank=rt.rank, world_size=rt.world_size, seed=cfg.trainer.seed)
    val = build_val_loader(d, tok, rank=rt.rank, world_size=rt.world_size) if cfg.trainer.val_every else None
    return train, val


@torch.no_grad()
def evaluate(model: GptOssForCausalLM, loader, rt: Runtime) -> float:
    """Mean token loss over one pass of the validation data (summed, then divided once)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    for b in loader:
        if int(b["num_target_tokens"]) == 0:
            continue
        with rt.autocast():
            total += model(**_model_inputs(b, rt.device), loss_normalizer=1.0).double()
        count += int(b["num_target_tokens"])
    model.train()
    return float(total) / max(count, 1)


def _model_inputs(b: dict, device: torch.device) -> dict:
    return {"input_ids": b["input_ids"].to(device), "labels": b["labels"].to(device),
            "position_ids": b["position_ids"].to(device),
            "doc_ids": None if b.get("doc_ids") is None else b["doc_ids"].to(device)}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(cfg: TrainConfig) -> dict:
    rt = setup_runtime(cfg)
    out = Path(cfg.trainer.output_dir)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    model = build_model(cfg, rt)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    loader, val_loader = build_loaders(cfg, model, rt)
    accum = cfg.data.grad_accum_steps(rt.world_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = model.num_parameters()
    log.info("model: %s, %.3fM params (%.3fM trainable), %s on %s, %d micro-batch(es) of %d per step",
             cfg.model.path or cfg.model.preset, n_params / 1e6, sum(p.numel() for p in trainable) / 1e6,
             str(rt.param_dtype).replace("torch.", ""), rt.device, accum, cfg.data.micro_batch_size)

    start_step = 0
    resume_from = ckpt.resolve_resume(out, cfg.trainer.resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, rt.rank, rt.world_size)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state["model"]]
        if missing:
            raise ValueError(f"{resume_from}: checkpoint lacks trainable weights {missing[:5]}")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state["model"]:
                    p.copy_(state["model"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)

    writer = MetricsWriter(out, rt.is_main)
    peak = peak_flops(rt.device)
    fpt = flops_per_token(model.config, cfg.data.max_seq_len)
    losses: list[float] = []
    progress = _progress(cfg, rt, start_step)
    for step in range(start_step, cfg.trainer.max_steps):
        t0 = time.perf_counter()
        batches = [next(loader) for _ in range(accum)]
        n_target = sum(int(b["num_target_tokens"]) for b in batches)
        n_tokens = sum(b["input_ids"].numel() for b in batches)
        loss_total = torch.zeros((), device=rt.device)
        for b in batches:
            with rt.autocast():
                loss = model(**_model_inputs(b, rt.device), loss_normalizer=max(n_target, 1))
            loss.backward()
            loss_total += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        lr = sched.get_last_lr()[0]
        if not math.isfinite(float(grad_norm)):
            raise FloatingPointError(f"step {step + 1}: non-finite gradient norm {float(grad_norm)}")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        loss_value = float(loss_total)
        losses.append(loss_value)
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": n_tokens * rt.world_size / dt, "step_time_s": dt}
        if peak:
            record["mfu"] = record["tokens_per_s"] * fpt / (peak * rt.world_size)
        mem = peak_memory_gb(rt.device)
        if mem is not None:
            record["peak_memory_gb"] = mem
        record.update(expert_load(model))
        if val_loader is not None and ((step + 1) % cfg.trainer.val_every == 0 or step + 1 == cfg.trainer.max_steps):
            record["val_loss"] = evaluate(model, val_loader, rt)
        if (step + 1) % cfg.trainer.log_every == 0 or step + 1 == cfg.trainer.max_steps:
            writer.write(record)
        progress(record)
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.trainer.max_steps:
            _save(cfg, rt, out, step + 1, model, opt, sched, loader)
    final = _save(cfg, rt, out, cfg.trainer.max_steps, model, opt, sched, loader)
    if hasattr(loader, "close"):
        loader.close()
    export_dir = _export(cfg, rt, out, model)
    log.info("done: final loss %.4f, checkpoint %s, export %s", losses[-1] if losses else float("nan"), final,
             export_dir)
    return {"losses": losses, "checkpoint": str(final), "export": str(export_dir) if export_dir else None}


def _save(cfg, rt, out, step, model, opt, sched, loader) -> Path:
    payload = {"step": step, "model": trainable_state(model), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "data": loader.state_dict(), "rng": _rng_state()}
    meta = {"recipe": cfg.recipe, "config": asdict(cfg)}
    return ckpt.save_checkpoint(out, step, payload, rank=rt.rank, world_size=rt.world_size, keep=cfg.checkpoint.keep,
                                extra_meta=meta)


def _export(cfg: TrainConfig, rt: Runtime, out: Path, model) -> Path | None:
    """LoRA: a PEFT adapter in out/adapter; full training: an HF checkpoint in out/hf."""
    if not rt.is_main:
        return None
    source = cfg.model.path if cfg.model.path and Path(cfg.model.path).is_dir() else None
    if cfg.peft.method == "lora":
        from .peft.peft_export import export_peft

        return export_peft(model, out / "adapter", base_model_name_or_path=cfg.model.path or "random-init",
                           overwrite=True)
    from .checkpoint.hf import save_hf

    target = out / "hf"
    save_hf(model, target, source_dir=source, overwrite=True)
    return target


def _progress(cfg: TrainConfig, rt: Runtime, start_step: int):
    total = cfg.trainer.max_steps
    t_start = time.perf_counter()

    def show(record: dict) -> None:
        if not rt.is_main:
            return
        step = record["step"]
        done = step - start_step
        eta = (time.perf_counter() - t_start) / max(done, 1) * (total - step)
        if step % cfg.trainer.log_every == 0 or step == total:
            val = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            log.info("step %d/%d  loss %.4f%s  lr %.2e  grad_norm %.3f  tok/s %.0f  eta %.0fs", step, total,
                     record["loss"], val, record["lr"], record["grad_norm"], record["tokens_per_s"], eta)

    return show
