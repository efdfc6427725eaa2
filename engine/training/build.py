"""Building what a run needs from its config: the process mesh, the model (with its expert slice,
weights and LoRA) and the data loaders. The trainer wires these together."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import TrainConfig
from engine.errors import ConfigError
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.parallel import Mesh
from engine.peft.config import LoraConfig
from engine.data.synthetic import SyntheticLoader

log = logging.getLogger("engine")


@dataclass
class Runtime:
    mesh: Mesh
    param_dtype: torch.dtype  # dtype of the stored (frozen or master) weights
    compute_dtype: torch.dtype  # dtype of the matmuls (autocast on GPU)
    # engine.parallel.context_parallel.ContextParallel over this rank's CP group when parallel.cp > 1
    # (pass it to the model as cp=...), else None.
    cp: Any = None

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    @property
    def is_main(self) -> bool:
        return self.mesh.is_main

    def autocast(self):
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.mesh.distributed:
            torch.distributed.barrier()


def setup_runtime(cfg: TrainConfig, arch: GptOssConfig) -> Runtime:
    """Process group and layout checks (on every rank, before any collective), device and dtypes."""
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                          "use trainer.device=cpu or auto, or check CUDA_VISIBLE_DEVICES and the driver")
    mesh = Mesh.from_env(ep=cfg.parallel.ep, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                         num_experts=arch.num_local_experts, timeout_s=cfg.parallel.timeout_s,
                         device=cfg.trainer.device, cp=cfg.parallel.cp)
    if mesh.device.type == "cpu":
        set_cpu_threads()
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if mesh.device.type == "cuda" else "float32"
    compute = getattr(torch, dtype)
    # Full training keeps fp32 weights and computes in bf16 under autocast, or (optim.master_weights)
    # keeps bf16 weights with fp32 masters in the optimizer; LoRA keeps the frozen base in the compute
    # dtype (its adapters in fp32, see build_model).
    # Under FSDP2 (parallel.shard=optimizer|full) the sharded weights themselves are the fp32 masters and
    # FSDP casts them to the compute dtype when it gathers them.
    fsdp = cfg.parallel.shard != "none" and mesh.distributed
    masters_in_optimizer = cfg.optim.master_weights and not fsdp
    param = torch.float32 if cfg.peft.method == "none" and not masters_in_optimizer else compute
    cp = None
    if mesh.cp > 1:
        from engine.parallel.context_parallel import ContextParallel

        cp = ContextParallel(mesh.cp_group)
    return Runtime(mesh, param, compute, cp)


def set_cpu_threads() -> int:
    """Intra-op threads for a CPU run: this machine's usable cores shared by the processes on it
    (torchrun's LOCAL_WORLD_SIZE), at least one, so processes never oversubscribe the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, rt: Runtime, arch: GptOssConfig | None = None,
                weights: bool = True) -> GptOssForCausalLM:
    """This rank's model: dense weights and its slice of the experts, loaded or randomly initialised
    (the same seed on every rank gives every rank the rows of the one-rank model), LoRA applied.
    `weights=False` (a dry run) builds it all on the meta device from `arch`: shapes, no memory."""
    opts = ModelOptions(experts_backend=cfg.model.experts_backend, attn_backend=cfg.model.attn_backend,
                        ce_chunk_size=cfg.model.ce_chunk_size, activation_offload=cfg.model.activation_offload,
                        moe_chunk_tokens=cfg.model.moe_chunk_tokens or 0)
    # Expert parallelism is applied from outside the model: each rank keeps only its experts' rows,
    # sliced on the meta device (or read from the checkpoint) before any memory is taken.
    from engine.moe.alltoall import apply_expert_parallel
    from engine.moe.experts import shard_model_experts

    if not weights:
        with torch.device("meta"):
            model = GptOssForCausalLM(arch, opts)
        shard_model_experts(model, rt.mesh.ep, rt.mesh.ep_rank)
    elif cfg.model.path:
        from engine.checkpoint.hf import load_hf

        model = load_hf(cfg.model.path, dtype=rt.param_dtype, device=rt.device, options=opts,
                        ep_size=rt.mesh.ep, ep_rank=rt.mesh.ep_rank, progress=rt.is_main)
    else:
        arch = arch or GptOssConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
        with torch.device("meta"):
            model = GptOssForCausalLM(arch, opts)
        shard_model_experts(model, rt.mesh.ep, rt.mesh.ep_rank)
        model.to_empty(device=rt.device)
        model.init_weights(seed=cfg.trainer.seed)
        model.to(rt.param_dtype)
    if cfg.model.activation_checkpointing:
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    apply_expert_parallel(model, rt.mesh)  # the all-to-all dispatchers (the slices are already kept)
    if cfg.peft.method == "lora":
        from engine.peft import apply_lora, format_report

        report = apply_lora(model, lora_config(cfg), seed=cfg.trainer.seed)
        # Adapters are tiny: keep them (and so AdamW's state) in fp32; autocast computes in bf16.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if rt.is_main:
            log.info("LoRA adapters:\n%s", format_report(report))
    if weights:
        from engine.parallel.fsdp import parallelize

        parallelize(model, rt.mesh, cfg.parallel.shard, rt.compute_dtype)
    return model


def lora_config(cfg: TrainConfig) -> LoraConfig:
    return LoraConfig(**{f.name: getattr(cfg.peft, f.name) for f in dataclasses.fields(LoraConfig)})


def resolve_tokenizer_path(cfg: TrainConfig) -> str | None:
    """data.tokenizer if set; else the model checkpoint's tokenizer.json; else the shipped one (None)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.path:
        from engine.checkpoint.hf.hub import resolve_checkpoint

        local = resolve_checkpoint(cfg.model.path)
        if (local / "tokenizer.json").is_file():
            return str(local)
    return None


def build_loaders(cfg: TrainConfig, model: GptOssForCausalLM, rt: Runtime):
    """(train loader, validation loader or None) for this rank. Rows are split over the data ranks
    (world / parallel.cp): the ranks of a CP group read the same rows and each keeps its chunks."""
    d = cfg.data
    rank, world = rt.mesh.data_rank, rt.mesh.data_size
    if d.source == "synthetic":
        return SyntheticLoader(model.config.vocab_size, d.max_seq_len, d.micro_batch_size, cfg.trainer.seed,
                               rank, world), None
    from engine.data import build_train_loader, build_val_loader, load_tokenizer

    tok = load_tokenizer(resolve_tokenizer_path(cfg))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; use the model's own tokenizer (data.tokenizer=...)")
    # Every record is validated (and the stores made, on rank 0) here, before step 1.
    root = Path(d.prepared_dir or Path(cfg.trainer.output_dir) / "data")
    if rt.mesh.cp > 1:
        # Several ranks are data rank 0 under CP: the world's rank 0 alone prepares the stores first
        # (the others wait), so the loaders below only ever find them current.
        from engine.data.loader import open_store

        open_store(d.resolved_train_path(), root / "train", d, tok, rank=rt.rank, world_size=rt.world_size)
        if cfg.trainer.val_every and d.resolved_val_path() is not None:
            open_store(d.resolved_val_path(), root / "val", d, tok, rank=rt.rank, world_size=rt.world_size)
    train = build_train_loader(d, tok, store_dir=root / "train", rank=rank, world_size=world, seed=cfg.trainer.seed)
    val = (build_val_loader(d, tok, store_dir=root / "val", rank=rank, world_size=world)
           if cfg.trainer.val_every else None)
    return train, val


__all__ = ["Runtime", "setup_runtime", "seed_everything", "build_model", "build_loaders"]
