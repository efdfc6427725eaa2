"""What a run builds from its config: the model (this rank's expert slice, its weights, LoRA, made
distributed by engine.parallel.parallelize) and the data loaders. The trainer wires these together."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from engine.data.synthetic import SyntheticLoader
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.parallel.parallelize import parallelize
from engine.peft.config import LoraConfig
from engine.training.runtime import Runtime

log = logging.getLogger(__name__)


def arch_of_run(cfg) -> GptOssConfig:
    """The architecture a TrainConfig will build, read without loading any weight."""
    if not cfg.model.path:
        return GptOssConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    from engine.checkpoint.hf.hub import resolve_checkpoint

    # A hub id is downloaded (or found in the cache) here; loading the weights then reuses it.
    return GptOssConfig.from_hf_dir(resolve_checkpoint(cfg.model.path))


def model_options(cfg) -> ModelOptions:
    m = cfg.model
    return ModelOptions(
        experts_backend=m.experts_backend,
        attn_backend=m.attn_backend,
        ce_chunk_size=m.ce_chunk_size,
        activation_offload=m.activation_offload,
        moe_chunk_tokens=m.moe_chunk_tokens or 0,
        expert_weights=m.expert_weights,
    )


def build_model(cfg, rt: Runtime, arch: GptOssConfig | None = None, weights: bool = True) -> GptOssForCausalLM:
    """This rank's model: built on the meta device, given its slice of the experts, then its weights (read
    from model.path, or randomly initialised: the same seed on every rank gives every rank the rows of the
    one-rank model) and LoRA, then made distributed (engine.parallel.parallelize). `weights=False` (a dry
    run) keeps it all on the meta device: shapes, no memory."""
    arch = arch or arch_of_run(cfg)
    with torch.device("meta"):
        model = GptOssForCausalLM(arch, model_options(cfg))

    def materialize(model: GptOssForCausalLM) -> GptOssForCausalLM:
        if weights:
            _weights(model, cfg, rt)
        if cfg.peft.method == "lora":
            _lora(model, cfg, rt)
        return model

    return parallelize(
        model,
        rt.mesh,
        materialize=materialize,
        activation_checkpointing=cfg.model.activation_checkpointing,
        shard=cfg.parallel.shard if weights else "none",
        compute_dtype=rt.compute_dtype,
    )


def _weights(model: GptOssForCausalLM, cfg, rt: Runtime) -> None:
    """Fill the meta model (this rank's expert rows only) from model.path, or with the seeded random init."""
    if cfg.model.path:
        from engine.checkpoint.hf.weights import read_hf_weights

        read_hf_weights(model, cfg.model.path, dtype=rt.param_dtype, device=rt.device, progress=rt.is_main)
        return
    model.to_empty(device=rt.device)
    model.init_weights(seed=cfg.trainer.seed)
    model.to(rt.param_dtype)


def _lora(model: GptOssForCausalLM, cfg, rt: Runtime) -> None:
    from engine.peft import apply_lora, format_report

    report = apply_lora(model, lora_config(cfg), seed=cfg.trainer.seed)
    # Adapters are tiny: keep them (and so AdamW's state) in fp32; autocast computes in bf16.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if rt.is_main:
        log.info("LoRA adapters:\n%s", format_report(report))


def lora_config(cfg) -> LoraConfig:
    return LoraConfig(**{f.name: getattr(cfg.peft, f.name) for f in dataclasses.fields(LoraConfig)})


def resolve_tokenizer_path(cfg) -> str | None:
    """data.tokenizer if set; else the model checkpoint's tokenizer.json; else the shipped one (None)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.path:
        from engine.checkpoint.hf.hub import resolve_checkpoint

        local = resolve_checkpoint(cfg.model.path)
        if (local / "tokenizer.json").is_file():
            return str(local)
    return None


def build_loaders(cfg, model: GptOssForCausalLM, rt: Runtime):
    """(train loader, validation loader or None) for this rank. Rows are split over the data ranks
    (world / parallel.cp): the ranks of a CP group read the same rows and each keeps its chunks."""
    d = cfg.data
    rank, world = rt.mesh.data_rank, rt.mesh.data_size
    if d.source == "synthetic":
        return SyntheticLoader(
            model.config.vocab_size, d.max_seq_len, d.micro_batch_size, cfg.trainer.seed, rank, world
        ), None
    from engine.data.loader import build_train_loader, build_val_loader
    from engine.data.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_tokenizer_path(cfg))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}; use the model's own tokenizer (data.tokenizer=...)"
        )
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
    val = (
        build_val_loader(d, tok, store_dir=root / "val", rank=rank, world_size=world) if cfg.trainer.val_every else None
    )
    return train, val
