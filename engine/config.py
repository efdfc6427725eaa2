"""Typed training config: the schema Hydra's composed config is checked against, once, at startup.

Every section is a dataclass whose fields (engine.schema.setting) carry their meaning, allowed values and
range: the one source of `python engine/train.py --help` and of the checks. `build_config(dict)` turns the
composed Hydra dict into them and raises `ConfigError` naming the full key (`optim.lr`), the bad value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .data.config import DataConfig as PipelineConfig
from .errors import ConfigError
from .peft.config import LoraConfig
from .schema import Range, setting


@dataclass
class ModelConfig:
    preset: str = setting("tiny", help="the built-in architecture used when model.path is null: tiny, gpt-oss-20b "
                          "or gpt-oss-120b (checked when the model is built)")
    path: str | None = setting(None, help="an HF checkpoint folder or hub id (e.g. openai/gpt-oss-20b); null = "
                               "random init from model.preset; a local folder is recorded as an absolute path")
    overrides: dict[str, Any] = setting(factory=dict, help="architecture fields over the preset's, e.g. "
                                        "{num_hidden_layers: 2}")
    dtype: str = setting("auto", choices=("auto", "bfloat16", "float32"),
                         help="weights and compute: auto = bf16 on GPU, fp32 on CPU")
    experts_backend: str = setting("auto", choices=("auto", "loop", "grouped_mm", "triton"),
                                   help="the experts' math: auto = triton on CUDA, loop elsewhere; loop is the "
                                   "reference, grouped_mm torch._grouped_mm, triton the fused kernels")
    attn_backend: str = setting("auto", choices=("auto", "eager", "flex", "blockwise", "triton"),
                                help="attention: auto = flex on CUDA, blockwise on CPU; eager materialises the "
                                "scores (reference)")
    activation_checkpointing: Any = setting(False, help="recompute layers in the backward: false, true (every "
                                            "layer) or a list of layer indices")
    activation_offload: bool = setting(False, help="checkpointed layers keep their inputs in pinned host memory "
                                       "(needs model.activation_checkpointing)")
    ce_chunk_size: int = setting(512, range=Range(1), help="tokens per chunk of the cross-entropy over the "
                                 "vocabulary (the full fp32 logits never exist)")
    moe_chunk_tokens: int | None = setting(None, help="the MoE layer runs its tokens in chunks of at most this "
                                           "many, each checkpointed (an integer >= 0; 0 or null: off)")


@dataclass
class ParallelConfig:
    ep: int = setting(1, range=Range(1), help="expert parallelism: consecutive ranks that share the experts")
    tp: int = setting(1, range=Range(1), help="tensor parallelism: not implemented, must be 1")
    pp: int = setting(1, range=Range(1), help="pipeline parallelism: not implemented, must be 1")
    cp: int = setting(1, range=Range(1), help="context parallelism: each row split over cp ranks "
                      "(data.max_seq_len a multiple of 2 x cp)")
    timeout_s: int = setting(600, range=Range(1), help="seconds before a rank that stops answering fails the others")
    shard: str = setting("none", choices=("none", "optimizer", "full"),
                         help="what FSDP2 shards over the data-parallel ranks: none, optimizer (gradients, AdamW "
                         "state, fp32 masters) or full (+ the weights)")


@dataclass
class OptimConfig:
    lr: float = setting(1e-4, range=Range(0, math.inf, True, True), help="peak learning rate, e.g. 1e-4")
    min_lr_ratio: float = setting(0.1, range=Range(0, 1), help="the cosine decays to lr * min_lr_ratio")
    warmup_steps: int = setting(10, help="linear warmup steps, from 0 to trainer.max_steps (a longer warmup is "
                                "cut to trainer.max_steps, with a warning)")
    schedule: str = setting("cosine", choices=("cosine", "constant"), help="the learning rate after the warmup")
    betas: tuple[float, float] = setting((0.9, 0.98), help="AdamW's moment decays, two numbers in [0, 1)")
    eps: float = setting(1e-8, range=Range(0, math.inf, True, True),
                         help="AdamW's epsilon, added to the denominator (e.g. 1e-8)")
    weight_decay: float = setting(0.0, range=Range(0, math.inf, False, True),
                                  help="AdamW's decoupled weight decay (never on biases, norms, sinks, embeddings)")
    grad_clip: float = setting(1.0, range=Range(0, math.inf, True), help="the largest global gradient norm "
                               "(inf: no clipping)")
    shard_state: bool = setting(False, help="replaced by parallel.shard (FSDP2); true is refused with a message")
    master_weights: bool = setting(False, help="full training: bf16 weights in the model, fp32 masters in the "
                                   "optimizer")
    impl: str = setting("auto", choices=("auto", "torch", "apex"),
                        help="auto = apex FusedAdam when importable on CUDA, else torch AdamW (fused on CUDA)")


@dataclass
class TrainerConfig:
    max_steps: int = setting(100, range=Range(1), help="optimizer steps of the whole run")
    output_dir: str = setting("outputs/run", help="metrics, checkpoints and the export; a folder holding a "
                              "finished run is refused")
    seed: int = setting(1234, help="seed of the weights' init, dropout and (unless data.seed) the data order")
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when a GPU is visible")
    log_every: int = setting(1, range=Range(1), help="a metrics line every N steps")
    val_every: int = setting(0, range=Range(0), help="validation loss every N steps on data.val_path (0 = never)")
    max_bad_steps: int = setting(5, range=Range(0), help="steps with non-finite loss/gradients skipped before "
                                 "the run stops")
    memory_check: bool = setting(True, help="refuse to start when the memory plan exceeds the GPU's memory")
    dry_run: bool = setting(False, help="check layout, shapes, LoRA targets and data, print the memory plan; "
                            "train nothing")
    dry_run_gpus: int = setting(0, help="GPUs a dry run plans for (0: the processes at hand, or lcm(ep, cp) if "
                                "larger)")
    gpu_memory_gb: float = setting(80.0, help="a dry run without a visible GPU checks its plan against this many GB")
    resume: str = setting("auto", help="auto (the newest complete checkpoint in trainer.output_dir), none (start "
                          "over) or the path of a checkpoint")
    progress: bool = setting(True, help="a progress bar on rank 0 when the output is a terminal (else log lines)")
    tensorboard: bool = setting(False, help="also write the metrics to OUTPUT/tensorboard (needs tensorboard)")
    sample_every: int = setting(0, range=Range(0), help="greedy generations for trainer.sample_prompts every N "
                                "steps (0 = never)")
    sample_prompts: str | None = setting(None, help="JSONL ({\"prompt\"} / {\"messages\"}) or text, one prompt "
                                         "per line")
    sample_max_new_tokens: int = setting(64, range=Range(1), help="tokens generated per sample prompt")


@dataclass
class CheckpointConfig:
    every: int = setting(0, range=Range(0), help="a checkpoint every N steps (0 = only at the end)")
    keep: int = setting(2, range=Range(1), help="checkpoints kept (the newest)")
    async_: bool = setting(False, help="`checkpoint.async`: write in the background while the next steps run")


@dataclass
class PeftConfig(LoraConfig):
    method: str = setting("none", choices=("none", "lora"), help="none (full fine-tuning) or lora")


@dataclass
class DataConfig(PipelineConfig):
    source: str = setting("jsonl", choices=("jsonl", "synthetic"), help="jsonl (harmony chats; null paths = the "
                          "shipped sample) or synthetic (a learnable token stream, no files)")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    recipe: str | None = setting(None, help="the recipe's name, for logs (recipe=NAME sets it)")

    def validate(self) -> list[str]:
        """Raise ConfigError naming the first bad key. Returns what was adjusted to fit (one line each, for
        the caller to log), e.g. a warmup longer than a short run, cut to its length."""
        _check_schema(self)
        adjusted = _fit_warmup(self)
        _check_ranges(self)
        _check_context_parallel(self)
        if self.model.activation_offload and not self.model.activation_checkpointing:
            raise ConfigError("model.activation_offload=true offloads the inputs of checkpointed layers; "
                              "set model.activation_checkpointing=true (or a list of layers) as well")
        if self.trainer.sample_every and not self.trainer.sample_prompts:
            raise ConfigError(f"trainer.sample_every={self.trainer.sample_every} needs trainer.sample_prompts=FILE "
                              "(JSONL of {\"prompt\": ...} records, or text with one prompt per line)")
        try:
            self.data.validate()
            if self.peft.method == "lora":
                self.peft.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return adjusted


def _check_schema(cfg: "TrainConfig") -> None:
    """The choices and ranges the schema gives the keys defined here; the data pipeline's data.* keys and
    LoRA's peft.* keys are checked by their own validate(), from the same kind of fields."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        own = vars(type(obj)).get("__annotations__", {})
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if f.name not in own:
                continue
            key, value = f"{section.name}.{f.name}", getattr(obj, f.name)
            allowed, rng = f.metadata.get("choices"), f.metadata.get("range")
            if allowed and value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
            integer = hints[f.name] is int
            if rng is not None and (not rng.holds(value) or integer and not isinstance(value, int)):
                raise ConfigError(f"{key}={value!r} must be {rng.text(integer)}; {f.metadata['help']}")


def _fit_warmup(cfg: "TrainConfig") -> list[str]:
    """A warmup longer than the run (a short smoke run of a recipe) is cut to the run's length."""
    o, t = cfg.optim, cfg.trainer
    if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps!r} must be an integer >= 0 (the warmup ends at "
                          f"most at trainer.max_steps={t.max_steps})")
    if o.warmup_steps <= t.max_steps:
        return []
    note = (f"optim.warmup_steps={o.warmup_steps} is longer than trainer.max_steps={t.max_steps}: the warmup is "
            f"cut to {t.max_steps} steps")
    o.warmup_steps = t.max_steps
    return [note]


def _check_ranges(cfg: "TrainConfig") -> None:
    """The keys whose checks are more than a choice or a range (lists, nullables, relations)."""
    o, t = cfg.optim, cfg.trainer
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={list(o.betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
    for i, beta in enumerate(o.betas):
        if not Range(0, 1, high_open=True).holds(beta):
            raise ConfigError(f"optim.betas[{i}]={beta!r} must be a number in [0, 1); AdamW's moment decay, "
                              "e.g. [0.9, 0.98]")
    for key in ("output_dir", "resume"):
        if not str(getattr(t, key)).strip():
            raise ConfigError(f"trainer.{key}={getattr(t, key)!r} must not be empty")
    chunk = cfg.model.moe_chunk_tokens
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        raise ConfigError(f"model.moe_chunk_tokens={chunk!r} must be an integer >= 0 (tokens per MoE chunk, e.g. "
                          "16384; 0 or null: no chunking)")
    ac = cfg.model.activation_checkpointing
    if not isinstance(ac, bool) and not (isinstance(ac, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ac)):
        raise ConfigError(f"model.activation_checkpointing={ac!r} must be true, false or a list of layer indices")


def _check_context_parallel(cfg: "TrainConfig") -> None:
    """parallel.cp cuts every row into 2*cp equal chunks and runs the blockwise attention."""
    cp, seq = cfg.parallel.cp, cfg.data.max_seq_len
    if cp > 1 and isinstance(seq, int) and seq % (2 * cp):
        fits = (seq // (2 * cp)) * 2 * cp
        raise ConfigError(f"data.max_seq_len={seq} must be a multiple of 2 x parallel.cp = {2 * cp} (each row is cut "
                          f"into {2 * cp} equal chunks); set data.max_seq_len={fits or 2 * cp} or {fits + 2 * cp}")
    if cp > 1 and cfg.model.attn_backend not in ("auto", "blockwise"):
        raise ConfigError(f"model.attn_backend={cfg.model.attn_backend!r} has no context-parallel path; with "
                          f"parallel.cp={cp} use model.attn_backend=blockwise (auto picks it)")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, key)
    origin = get_origin(typ)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin is None and typ in (int, float, str, bool) and value is not None:
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r} must be of type {typ.__name__}")
    if value is None:
        if typ is Any or type(None) in get_args(typ):
            return None
        raise ConfigError(f"{key}=null is not allowed; give a value (see conf/config.yaml for the default)")
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    # A key that is a Python keyword (checkpoint.async) is the field with a trailing underscore.
    values = {(k + "_" if keyword.iskeyword(k) else k): v for k, v in values.items()}
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"did you mean {where + close[0]!r}? " if close else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; {hint}"
                          f"valid keys under {prefix or 'the top level'}: {sorted(names)}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def build_config(values: dict[str, Any], *, quiet: bool = False) -> TrainConfig:
    """A plain dict (e.g. `OmegaConf.to_container(cfg, resolve=True)`) -> validated TrainConfig. What
    validation adjusted is logged as a warning (unless `quiet`). A local model.path is made absolute, so
    the checkpoints and exports that record it work from any directory; a hub id stays as given."""
    values = {k: v for k, v in values.items() if k != "hydra"}
    cfg = _build(TrainConfig, values, "")
    for note in cfg.validate():
        if not quiet:
            logging.getLogger("engine").warning("%s", note)
    if cfg.model.path is not None and Path(cfg.model.path).expanduser().exists():
        cfg.model.path = os.path.abspath(os.path.expanduser(cfg.model.path))
    return cfg
