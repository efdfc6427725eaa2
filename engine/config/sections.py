"""The training config's schema: one dataclass per section, each field (engine.config.schema.setting) with
its default, meaning, and allowed values or range. It is what Hydra's composed config is checked against
(engine.config.load), what `python engine/train.py --help` prints and what conf/config.yaml is generated
from (engine.config.compose). Allowed values come from engine.config.choices (torch-free), which the
modules that dispatch on them import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.config.choices import (
    ATTN_BACKENDS,
    DEVICES,
    EXPERT_BACKENDS,
    EXPERT_WEIGHTS,
    MODEL_DTYPES,
    OPTIMIZER_IMPLS,
    PEFT_METHODS,
    SCHEDULES,
    SHARD_MODES,
)
from engine.config.schema import Range, setting
from engine.data.config import DataConfig
from engine.peft.config import LoraConfig


@dataclass
class ModelConfig:
    preset: str = setting(
        "tiny",
        help="the built-in architecture used when model.path is null: tiny, gpt-oss-20b "
        "or gpt-oss-120b (checked when the model is built)",
    )
    path: str | None = setting(
        None,
        help="an HF checkpoint folder or hub id (e.g. openai/gpt-oss-20b); null = "
        "random init from model.preset; a local folder is recorded as an absolute path",
    )
    overrides: dict[str, Any] = setting(
        factory=dict, help="architecture fields over the preset's, e.g. {num_hidden_layers: 2}"
    )
    dtype: str = setting("auto", choices=MODEL_DTYPES, help="weights and compute: auto = bf16 on GPU, fp32 on CPU")
    experts_backend: str = setting(
        "auto",
        choices=("auto", *EXPERT_BACKENDS),
        help="the experts' math: auto = triton on CUDA, loop elsewhere; loop is the "
        "reference, grouped_mm torch._grouped_mm, triton the fused kernels",
    )
    attn_backend: str = setting(
        "auto",
        choices=("auto", *ATTN_BACKENDS),
        help="attention: auto = flex on CUDA, blockwise on CPU; eager materialises the scores (reference)",
    )
    activation_checkpointing: Any = setting(
        False, help="recompute layers in the backward: false, true (every layer) or a list of layer indices"
    )
    activation_offload: bool = setting(
        False, help="checkpointed layers keep their inputs in pinned host memory (needs model.activation_checkpointing)"
    )
    ce_chunk_size: int = setting(
        512,
        range=Range(1),
        help="tokens per chunk of the cross-entropy over the vocabulary (the full fp32 logits never exist)",
    )
    expert_weights: str = setting(
        "dense",
        choices=EXPERT_WEIGHTS,
        help="the experts' projections: dense (trainable, in model.dtype) or mxfp4 (frozen, kept packed as "
        "an MXFP4 checkpoint stores them, ~4.25 bits a weight; needs model.path to one and peft.method=lora)",
    )
    moe_chunk_tokens: int | None = setting(
        None,
        help="the MoE layer runs its tokens in chunks of at most this "
        "many, each checkpointed (an integer >= 0; 0 or null: off)",
    )


@dataclass
class ParallelConfig:
    ep: int = setting(1, range=Range(1), help="expert parallelism: consecutive ranks that share the experts")
    cp: int = setting(
        1,
        range=Range(1),
        help="context parallelism: each row split over cp ranks (data.max_seq_len a multiple of 2 x cp)",
    )
    timeout_s: int = setting(600, range=Range(1), help="seconds before a rank that stops answering fails the others")
    shard: str = setting(
        "none",
        choices=SHARD_MODES,
        help="what FSDP2 shards over the data-parallel ranks: none, optimizer (gradients, AdamW "
        "state, fp32 masters) or full (+ the weights)",
    )


@dataclass
class OptimConfig:
    lr: float = setting(1e-4, range=Range(0, math.inf, True, True), help="peak learning rate, e.g. 1e-4")
    min_lr_ratio: float = setting(0.1, range=Range(0, 1), help="the cosine decays to lr * min_lr_ratio")
    warmup_steps: int = setting(
        10,
        help="linear warmup steps, from 0 to trainer.max_steps (a longer warmup is "
        "cut to trainer.max_steps, with a warning)",
    )
    schedule: str = setting("cosine", choices=SCHEDULES, help="the learning rate after the warmup")
    betas: tuple[float, float] = setting((0.9, 0.98), help="AdamW's moment decays, two numbers in [0, 1)")
    eps: float = setting(
        1e-8, range=Range(0, math.inf, True, True), help="AdamW's epsilon, added to the denominator (e.g. 1e-8)"
    )
    weight_decay: float = setting(
        0.0,
        range=Range(0, math.inf, False, True),
        help="AdamW's decoupled weight decay (never on biases, norms, sinks, embeddings)",
    )
    grad_clip: float = setting(
        1.0, range=Range(0, math.inf, True), help="the largest global gradient norm (inf: no clipping)"
    )
    master_weights: bool = setting(
        False, help="full training: bf16 weights in the model, fp32 masters in the optimizer"
    )
    impl: str = setting(
        "auto",
        choices=OPTIMIZER_IMPLS,
        help="auto = apex FusedAdam when importable on CUDA, else torch AdamW (fused on CUDA)",
    )


@dataclass
class TrainerConfig:
    max_steps: int = setting(100, range=Range(1), help="optimizer steps of the whole run")
    output_dir: str = setting(
        "outputs/run", help="metrics, checkpoints and the export; a folder holding a finished run is refused"
    )
    seed: int = setting(1234, help="seed of the weights' init, dropout and (unless data.seed) the data order")
    device: str = setting("auto", choices=DEVICES, help="auto = cuda when a GPU is visible")
    log_every: int = setting(1, range=Range(1), help="a metrics line every N steps")
    val_every: int = setting(0, range=Range(0), help="validation loss every N steps on data.val_path (0 = never)")
    max_bad_steps: int = setting(
        5, range=Range(0), help="steps with non-finite loss/gradients skipped before the run stops"
    )
    memory_check: bool = setting(True, help="refuse to start when the memory plan exceeds the GPU's memory")
    dry_run: bool = setting(
        False, help="check layout, shapes, LoRA targets and data, print the memory plan; train nothing"
    )
    dry_run_gpus: int = setting(0, help="GPUs a dry run plans for (0: the processes at hand, or lcm(ep, cp) if larger)")
    gpu_memory_gb: float = setting(80.0, help="a dry run without a visible GPU checks its plan against this many GB")
    resume: str = setting(
        "auto",
        help="auto (the newest complete checkpoint in trainer.output_dir), none (start "
        "over) or the path of a checkpoint",
    )
    progress: bool = setting(True, help="a progress bar on rank 0 when the output is a terminal (else log lines)")
    tensorboard: bool = setting(False, help="also write the metrics to OUTPUT/tensorboard (needs tensorboard)")
    sample_every: int = setting(
        0, range=Range(0), help="greedy generations for trainer.sample_prompts every N steps (0 = never)"
    )
    sample_prompts: str | None = setting(None, help='JSONL ({"prompt"} / {"messages"}) or text, one prompt per line')
    sample_max_new_tokens: int = setting(64, range=Range(1), help="tokens generated per sample prompt")
    preempt_signals: list[str] = setting(
        factory=lambda: ["SIGTERM", "SIGUSR1"],
        help="signals that stop the run at the next step boundary with a checkpoint and exit code 75 ([] = none)",
    )
    preempt_grace_s: float = setting(
        25.0,
        range=Range(0, math.inf, True, True),
        help="seconds from a preemption signal to the end of its checkpoint; past them the run stops without it",
    )


@dataclass
class CheckpointConfig:
    every: int = setting(0, range=Range(0), help="a checkpoint every N steps (0 = only at the end)")
    keep: int = setting(2, range=Range(1), help="checkpoints kept (the newest)")
    async_: bool = setting(False, help="`checkpoint.async`: write in the background while the next steps run")
    verify: bool = setting(
        True,
        help="record every checkpoint file's sha256 in meta.json as it is written, and check them before "
        "resuming (each rank its share) or exporting; false skips both (see the README for the cost)",
    )


@dataclass
class PeftConfig(LoraConfig):
    method: str = setting("none", choices=PEFT_METHODS, help="none (full fine-tuning) or lora")


@dataclass
class KernelsConfig:
    """The Triton kernels' choices (gptoss_kernels.gemm_configs.configure), applied at the start of a run and
    recorded with the config in every checkpoint."""

    autotune: bool = setting(
        False,
        help="time the grouped GEMM's tile configs on the first launch of each shape "
        "bucket on CUDA and keep the fastest (off: the deterministic heuristic config)",
    )
    persistent: bool = setting(
        False,
        help="add the persistent tile scheduler (one program per SM) to the grouped "
        "GEMM's configs; opt-in until timed on a GPU",
    )
    tma: bool = setting(
        False, help="load the grouped GEMM's weight tiles through TMA descriptors (Hopper); opt-in until timed on a GPU"
    )
    cache_dir: str | None = setting(
        None,
        help="folder of the autotuner's choices (gemm_configs.json); null = "
        "$GPTOSS_KERNEL_CACHE_DIR, else ~/.cache/gptoss-engine; an empty string keeps "
        "them in memory only",
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    recipe: str | None = setting(None, help="the recipe's name, for logs (recipe=NAME sets it)")
