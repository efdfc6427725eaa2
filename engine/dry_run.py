"""`trainer.dry_run=true`: everything but the weights and the steps, for the GPUs a recipe targets.

It plans memory as the run will be on its GPUs (the dtype and attention backend CUDA gets), for
`trainer.dry_run_gpus` GPUs (default: the processes at hand, or lcm(parallel.ep, parallel.cp) if
larger) against `trainer.gpu_memory_gb` when no GPU is visible, and refuses a plan that does not fit. With as many
processes as planned GPUs it then builds the model's shapes on the meta device, applies LoRA,
splits the batch and reads one batch of real data. A hub model that cannot be reached (offline) is
planned with the built-in architecture of the same name, and the dry run says so.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from .checkpoint.errors import CheckpointNotFoundError
from .config import TrainConfig
from .memory_plan import GiB, arch_of_run, check_fits, plan_for_run
from .models.gpt_oss import GptOssConfig

log = logging.getLogger(__name__)

# Hub ids whose architecture is built in: a dry run needs no download for them.
_BUILT_IN = {"gpt-oss-20b": "gpt-oss-20b", "gpt-oss-120b": "gpt-oss-120b"}


def arch_for_dry_run(cfg: TrainConfig) -> tuple[GptOssConfig, str]:
    """The architecture to plan with, and where it came from."""
    try:
        arch = arch_of_run(cfg)
        return arch, (f"config.json of {cfg.model.path}" if cfg.model.path else f"preset {cfg.model.preset}")
    except CheckpointNotFoundError as e:
        name = str(cfg.model.path).rstrip("/").rsplit("/", 1)[-1].lower()
        if name not in _BUILT_IN:
            raise
        log.warning("dry run: %s; planning with the built-in %s architecture instead", e, _BUILT_IN[name])
        return GptOssConfig.from_preset(_BUILT_IN[name]), f"built-in {_BUILT_IN[name]} (model.path not reachable)"


def dry_run(cfg: TrainConfig) -> dict:
    import torch

    arch, source = arch_for_dry_run(cfg)
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = cfg.trainer.dry_run_gpus or max(procs, math.lcm(cfg.parallel.ep, cfg.parallel.cp))
    device_type = "cpu" if cfg.trainer.device == "cpu" else "cuda"
    plan = plan_for_run(cfg, arch, device_type, gpus)
    if device_type == "cuda":
        if torch.cuda.is_available():
            capacity, where = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
        else:
            capacity, where = cfg.trainer.gpu_memory_gb * GiB, f"trainer.gpu_memory_gb={cfg.trainer.gpu_memory_gb:g}"
    else:
        capacity, where = None, "CPU (no memory check)"
    unit = "GPU" if device_type == "cuda" else "process"
    log.info("dry run: architecture from %s; memory plan per %s for %d %ss, parallel.ep=%d, parallel.cp=%d, "
             "against %s:\n%s", source, unit, gpus, unit, cfg.parallel.ep, cfg.parallel.cp, where, plan.format())
    check_fits(plan, capacity, cfg.trainer.memory_check)
    info = {"architecture": source, "planned_gpus" if device_type == "cuda" else "planned_processes": gpus,
            "plan_gib_per_gpu" if device_type == "cuda" else "plan_gib_per_process": round(plan.total / GiB, 1)}
    if gpus != procs:
        log.info("dry run: the plan fits; the model build, LoRA report and data checks need the real layout: "
                 "launch with %d processes (torchrun --nproc_per_node=... --nnodes=...) to run them, on any "
                 "machine (CPU included)\n  %s\nplan checks passed; nothing was trained", gpus,
                 "\n  ".join(f"{k}: {v}" for k, v in info.items()))
        return info
    if source.startswith("built-in") and not cfg.data.tokenizer:
        import dataclasses

        shipped = Path(__file__).resolve().parent / "data" / "assets" / "tokenizer" / "tokenizer.json"
        log.warning("dry run: the model's tokenizer is not reachable either; reading the data with the shipped "
                    "o200k harmony tokenizer (%s)", shipped)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(shipped)))
    return {**info, **_build_checks(cfg, arch)}


def _build_checks(cfg: TrainConfig, arch: GptOssConfig) -> dict:
    """Layout, the model's shapes on the meta device, the LoRA report, the batch split, one batch."""
    from .build import build_loaders, build_model, setup_runtime
    from .parallel import global_token_count

    rt = setup_runtime(cfg, arch)
    model = build_model(cfg, rt, arch, weights=False)
    accum = cfg.data.grad_accum_steps(rt.mesh.data_size)
    loader, _ = build_loaders(cfg, model, rt)
    batch = next(loader)
    if hasattr(loader, "close"):
        loader.close()
    n_target = int(global_token_count(int(batch["num_target_tokens"]), rt.mesh)) // rt.mesh.cp
    info = {"params_on_rank": model.num_parameters(), "trainable_on_rank": model.num_parameters(trainable_only=True),
            "micro_batches_per_rank": accum, "first_batch_shape": list(batch["input_ids"].shape),
            "first_batch_target_tokens_all_ranks": n_target}
    # How the rows pack (first epoch), as the first metrics line will report it.
    report = getattr(loader, "report", {})
    info.update({k: report[k] for k in ("data_rows", "data_padding_tokens") if k in report})
    if "data_packing_efficiency" in report:
        info["data_packing_efficiency"] = round(report["data_packing_efficiency"], 4)
    log.info("dry run: mesh %s\n  %s\nall checks passed; nothing was trained", rt.mesh,
             "\n  ".join(f"{k}: {v}" for k, v in info.items()))
    rt.mesh.destroy()
    return info
