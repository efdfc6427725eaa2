"""The process a run lives in: the mesh (process groups, layout checks), the device and dtypes, the
context each forward runs under (autocast, context parallelism), seeds, CPU threads and kernel settings."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import ConfigError
from engine.parallel import Mesh
from engine.parallel.context_parallel import ContextParallel


@dataclass
class Runtime:
    mesh: Mesh
    param_dtype: torch.dtype  # dtype of the stored (frozen or master) weights
    compute_dtype: torch.dtype  # dtype of the matmuls (autocast on GPU)
    cp: ContextParallel | None = None  # this rank's context-parallel group when parallel.cp > 1

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

    @contextlib.contextmanager
    def forward_context(self):
        """What every training or validation forward runs under: autocast, and context parallelism."""
        with self.autocast(), self.cp or contextlib.nullcontext():
            yield

    def barrier(self) -> None:
        if self.mesh.distributed:
            torch.distributed.barrier()


def setup_runtime(cfg, arch) -> Runtime:
    """Process group and layout checks (on every rank, before any collective), device and dtypes."""
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use trainer.device=cpu or auto, or check CUDA_VISIBLE_DEVICES and the driver"
        )
    mesh = Mesh.from_env(
        ep=cfg.parallel.ep,
        num_experts=arch.num_local_experts,
        timeout_s=cfg.parallel.timeout_s,
        device=cfg.trainer.device,
        cp=cfg.parallel.cp,
    )
    if mesh.device.type == "cpu":
        set_cpu_threads()
    configure_kernels(cfg.kernels)
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if mesh.device.type == "cuda" else "float32"
    compute = getattr(torch, dtype)
    # Full training keeps fp32 weights and computes in bf16 under autocast, or (optim.master_weights)
    # keeps bf16 weights with fp32 masters in the optimizer; LoRA keeps the frozen base in the compute
    # dtype (its adapters in fp32, see engine.training.build). Under FSDP2 (parallel.shard=optimizer|full)
    # the sharded weights themselves are the fp32 masters and FSDP casts them when it gathers them.
    fsdp = cfg.parallel.shard != "none" and mesh.distributed
    masters_in_optimizer = cfg.optim.master_weights and not fsdp
    param = torch.float32 if cfg.peft.method == "none" and not masters_in_optimizer else compute
    cp = ContextParallel(mesh.cp_group) if mesh.cp > 1 else None
    return Runtime(mesh, param, compute, cp)


def configure_kernels(kernels) -> None:
    """kernels.* (autotune, persistent, tma, cache_dir) into the Triton kernels' settings, for this process."""
    from gptoss_kernels import gemm_configs

    gemm_configs.configure(
        autotune=kernels.autotune, persistent=kernels.persistent, tma=kernels.tma, cache_dir=kernels.cache_dir
    )


def set_cpu_threads() -> int:
    """Intra-op threads for a CPU run: OMP_NUM_THREADS when it is set (the user's or the launcher's word),
    else this machine's usable cores shared by the processes on it (torchrun's LOCAL_WORLD_SIZE), at least
    one, so processes never oversubscribe the cores (oversubscribed OpenMP threads spin-wait for each other:
    a run beside other busy processes would crawl)."""
    asked = os.environ.get("OMP_NUM_THREADS", "").strip()
    if asked.isdigit() and int(asked) > 0:
        threads = int(asked)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
