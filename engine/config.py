"""Typed training config: the schema Hydra's composed config is checked against, once, at startup.

Every section is a dataclass; `build_config(dict)` turns the composed Hydra dict into them and raises
`ConfigError` naming the full key (`optim.lr`), the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import keyword
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from .data.config import DataConfig as PipelineConfig
from .errors import ConfigError
from .peft.config import LoraConfig


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | gpt-oss-20b | gpt-oss-120b (used when path is null)
    path: str | None = None  # HF checkpoint dir or hub id; null = random init from the preset
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture fields, e.g. num_hidden_layers
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    experts_backend: str = "auto"  # auto | loop | grouped_mm | triton
    attn_backend: str = "auto"  # auto (flex on CUDA, blockwise on CPU) | eager | flex | blockwise | triton
    activation_checkpointing: Any = False  # false | true | list of layer indices
    activation_offload: bool = False  # checkpointed layers keep their inputs in pinned host memory
    ce_chunk_size: int = 512
    moe_chunk_tokens: int | None = None  # the MoE layer runs its tokens in chunks of at most this many (0/null: off)


@dataclass
class ParallelConfig:
    ep: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: each row split over cp ranks (engine.parallel.context_parallel)
    timeout_s: int = 600  # a rank that stops answering fails the others after this long
    shard: str = "none"  # none | optimizer | full: what FSDP2 shards over the data-parallel ranks


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    shard_state: bool = False  # replaced by parallel.shard (FSDP2); true is refused with a message
    master_weights: bool = False  # bf16 weights in the model, fp32 masters in the optimizer (full training)
    impl: str = "auto"  # auto (apex FusedAdam when importable on CUDA, else torch) | torch | apex


@dataclass
class TrainerConfig:
    max_steps: int = 100
    output_dir: str = "outputs/run"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 1
    val_every: int = 0  # validation loss every N steps on data.val_path (0 = never)
    max_bad_steps: int = 5  # steps with non-finite loss/gradients skipped before the run stops
    memory_check: bool = True  # refuse to start when the memory plan exceeds the GPU's memory
    dry_run: bool = False  # check layout, shapes, LoRA targets and data, print the plan, train nothing
    dry_run_gpus: int = 0  # GPUs a dry run plans for (0: the processes at hand, or lcm(ep, cp) if larger)
    gpu_memory_gb: float = 80.0  # a dry run without a visible GPU checks its plan against this
    resume: str = "auto"  # auto | none | PATH
    progress: bool = True  # a progress bar on rank 0 when the output is a terminal (else log lines)
    tensorboard: bool = False  # also write the metrics to OUTPUT/tensorboard
    sample_every: int = 0  # greedy generations for sample_prompts every N steps (0 = never)
    sample_prompts: str | None = None  # JSONL ({"prompt"} / {"messages"}) or text, one prompt per line
    sample_max_new_tokens: int = 64


@dataclass
class CheckpointConfig:
    every: int = 0  # 0 = only at the end
    keep: int = 2
    async_: bool = False  # `checkpoint.async`: write in the background while the next steps run


@dataclass
class PeftConfig(LoraConfig):
    method: str = "none"  # none (full fine-tuning) | lora


@dataclass
class DataConfig(PipelineConfig):
    source: str = "jsonl"  # jsonl (harmony chats; null paths = the shipped sample) | synthetic (no files)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    recipe: str | None = None  # the recipe's name, for logs

    def validate(self) -> None:
        checks = [
            ("model.dtype", self.model.dtype, ("auto", "bfloat16", "float32")),
            ("model.experts_backend", self.model.experts_backend, ("auto", "loop", "grouped_mm", "triton")),
            ("model.attn_backend", self.model.attn_backend, ("auto", "eager", "flex", "blockwise", "triton")),
            ("optim.schedule", self.optim.schedule, ("cosine", "constant")),
            ("optim.impl", self.optim.impl, ("auto", "torch", "apex")),
            ("trainer.device", self.trainer.device, ("auto", "cpu", "cuda")),
            ("peft.method", self.peft.method, ("none", "lora")),
            ("data.source", self.data.source, ("jsonl", "synthetic")),
            ("parallel.shard", self.parallel.shard, ("none", "optimizer", "full")),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
        positive = {"trainer.max_steps": self.trainer.max_steps, "parallel.ep": self.parallel.ep,
                    "parallel.tp": self.parallel.tp, "parallel.pp": self.parallel.pp, "parallel.cp": self.parallel.cp}
        for key, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        _check_ranges(self)
        _check_context_parallel(self)
        if self.model.activation_offload and not self.model.activation_checkpointing:
            raise ConfigError("model.activation_offload=true offloads the inputs of checkpointed layers; "
                              "set model.activation_checkpointing=true (or a list of layers) as well")
        if self.trainer.sample_every < 0 or self.trainer.sample_max_new_tokens < 1:
            raise ConfigError(f"trainer.sample_every={self.trainer.sample_every} must be >= 0 and "
                              f"trainer.sample_max_new_tokens={self.trainer.sample_max_new_tokens} >= 1")
        if self.trainer.sample_every and not self.trainer.sample_prompts:
            raise ConfigError(f"trainer.sample_every={self.trainer.sample_every} needs trainer.sample_prompts=FILE "
                              "(JSONL of {\"prompt\": ...} records, or text with one prompt per line)")
        try:
            self.data.validate()
            if self.peft.method == "lora":
                self.peft.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _number(key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False, why: str = "") -> None:
    """`value` must be a real number in [low, high] (an open end where asked); nan never passes."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        hi_text = "inf" if high == math.inf else f"{high:g}"
        raise ConfigError(f"{key}={value!r} must be a number in {lo}{low:g}, {hi_text}{hi}"
                          + (f"; {why}" if why else ""))


def _check_ranges(cfg: "TrainConfig") -> None:
    """Every numeric key in its range, with the relations between keys; the first bad one is named."""
    o, t = cfg.optim, cfg.trainer
    _number("optim.lr", o.lr, 0, low_open=True, high_open=True, why="a finite learning rate such as 1e-4")
    _number("optim.min_lr_ratio", o.min_lr_ratio, 0, 1, why="the cosine ends at lr * min_lr_ratio (0.1 is usual)")
    if not 0 <= o.warmup_steps <= t.max_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps!r} must be between 0 and trainer.max_steps="
                          f"{t.max_steps}: the warmup must end within the run; set optim.warmup_steps=N to match")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={list(o.betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
    for i, beta in enumerate(o.betas):
        _number(f"optim.betas[{i}]", beta, 0, 1, high_open=True, why="AdamW's moment decay, e.g. [0.9, 0.98]")
    _number("optim.eps", o.eps, 0, low_open=True, high_open=True, why="AdamW's epsilon, e.g. 1e-8")
    _number("optim.weight_decay", o.weight_decay, 0, high_open=True, why="0.0 or e.g. 0.1")
    _number("optim.grad_clip", o.grad_clip, 0, low_open=True,
            why="the largest global gradient norm (1.0 is usual; inf turns clipping off)")
    for key, value, low in (("trainer.log_every", t.log_every, 1), ("trainer.val_every", t.val_every, 0),
                            ("trainer.max_bad_steps", t.max_bad_steps, 0),
                            ("checkpoint.every", cfg.checkpoint.every, 0), ("checkpoint.keep", cfg.checkpoint.keep, 1),
                            ("parallel.timeout_s", cfg.parallel.timeout_s, 1),
                            ("model.ce_chunk_size", cfg.model.ce_chunk_size, 1)):
        if value < low:
            raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
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


def build_config(values: dict[str, Any]) -> TrainConfig:
    """A plain dict (e.g. `OmegaConf.to_container(cfg, resolve=True)`) -> validated TrainConfig."""
    values = {k: v for k, v in values.items() if k != "hydra"}
    cfg = _build(TrainConfig, values, "")
    cfg.validate()
    return cfg
