"""From Hydra's composed dict to a validated TrainConfig (engine.config.sections), once, at startup.

`build_config(dict)` raises ConfigError naming the full key (`optim.lr`), the bad value and what is allowed,
reading the choices and ranges from the schema's fields; a key that no longer exists says what replaced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import logging
import os
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from engine.config.schema import Range, type_text
from engine.config.sections import TrainConfig
from engine.errors import ConfigError

# Keys that once existed: naming one is an error that says why it went and what to use instead.
REMOVED_KEYS = {
    "parallel.tp": "tensor parallelism is not implemented (GPT-OSS trains with parallel.ep and TP=1); remove it",
    "parallel.pp": "pipeline parallelism is not implemented; remove it",
    "optim.shard_state": "the optimizer state is sharded by FSDP2: use parallel.shard=optimizer (gradients + "
    "optimizer state) or parallel.shard=full (+ the weights)",
}
_REMOVED_DEFAULTS = {"parallel.tp": 1, "parallel.pp": 1, "optim.shard_state": False}


def validate(cfg: TrainConfig) -> list[str]:
    """Raise ConfigError naming the first bad key. Returns what was adjusted to fit (one line each, for
    the caller to log), e.g. a warmup longer than a short run, cut to its length."""
    _check_schema(cfg)
    adjusted = _fit_warmup(cfg)
    _check_ranges(cfg)
    _check_context_parallel(cfg)
    if cfg.model.activation_offload and not cfg.model.activation_checkpointing:
        raise ConfigError(
            "model.activation_offload=true offloads the inputs of checkpointed layers; "
            "set model.activation_checkpointing=true (or a list of layers) as well"
        )
    _check_expert_weights(cfg)
    if cfg.trainer.sample_every and not cfg.trainer.sample_prompts:
        raise ConfigError(
            f"trainer.sample_every={cfg.trainer.sample_every} needs trainer.sample_prompts=FILE "
            '(JSONL of {"prompt": ...} records, or text with one prompt per line)'
        )
    try:
        cfg.data.validate()
        if cfg.peft.method == "lora":
            cfg.peft.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return adjusted


def _check_schema(cfg: TrainConfig) -> None:
    """The choices and ranges the schema gives the keys defined here; the data pipeline's data.* keys and
    LoRA's peft.* keys are checked by their own validate(), from the same kind of fields."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj) or section.name == "data":  # DataConfig.validate checks data.*
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


def _fit_warmup(cfg: TrainConfig) -> list[str]:
    """A warmup longer than the run (a short smoke run of a recipe) is cut to the run's length."""
    o, t = cfg.optim, cfg.trainer
    if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps!r} must be an integer >= 0 (the warmup ends at "
            f"most at trainer.max_steps={t.max_steps})"
        )
    if o.warmup_steps <= t.max_steps:
        return []
    note = (
        f"optim.warmup_steps={o.warmup_steps} is longer than trainer.max_steps={t.max_steps}: the warmup is "
        f"cut to {t.max_steps} steps"
    )
    o.warmup_steps = t.max_steps
    return [note]


def _check_ranges(cfg: TrainConfig) -> None:
    """The keys whose checks are more than a choice or a range (lists, nullables, relations)."""
    o, t = cfg.optim, cfg.trainer
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={list(o.betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
    for i, beta in enumerate(o.betas):
        if not Range(0, 1, high_open=True).holds(beta):
            raise ConfigError(
                f"optim.betas[{i}]={beta!r} must be a number in [0, 1); AdamW's moment decay, e.g. [0.9, 0.98]"
            )
    for key in ("output_dir", "resume"):
        if not str(getattr(t, key)).strip():
            raise ConfigError(f"trainer.{key}={getattr(t, key)!r} must not be empty")
    chunk = cfg.model.moe_chunk_tokens
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        raise ConfigError(
            f"model.moe_chunk_tokens={chunk!r} must be an integer >= 0 (tokens per MoE chunk, e.g. "
            "16384; 0 or null: no chunking)"
        )
    ac = cfg.model.activation_checkpointing
    if not isinstance(ac, bool) and not (
        isinstance(ac, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ac)
    ):
        raise ConfigError(f"model.activation_checkpointing={ac!r} must be true, false or a list of layer indices")


def _check_expert_weights(cfg: TrainConfig) -> None:
    """MXFP4 experts are frozen and read packed from an MXFP4 checkpoint."""
    if cfg.model.expert_weights != "mxfp4":
        return
    if cfg.peft.method != "lora":
        raise ConfigError(
            f"model.expert_weights=mxfp4 keeps the experts frozen, but peft.method={cfg.peft.method!r} would train "
            "them; use peft.method=lora, or model.expert_weights=dense for full fine-tuning"
        )
    if cfg.parallel.shard != "none":
        raise ConfigError(
            f"model.expert_weights=mxfp4 with parallel.shard={cfg.parallel.shard!r} is not supported yet (FSDP2 "
            "shards parameters, not the packed expert buffers); use parallel.shard=none, the base is frozen anyway"
        )
    if not cfg.model.path:
        raise ConfigError(
            "model.expert_weights=mxfp4 reads the packed experts from an MXFP4 checkpoint; set model.path "
            "(e.g. openai/gpt-oss-20b), or model.expert_weights=dense for a randomly initialised model"
        )


def _check_context_parallel(cfg: TrainConfig) -> None:
    """parallel.cp cuts every row into 2*cp equal chunks and runs the blockwise attention."""
    cp, seq = cfg.parallel.cp, cfg.data.max_seq_len
    if cp > 1 and isinstance(seq, int) and seq % (2 * cp):
        fits = (seq // (2 * cp)) * 2 * cp
        raise ConfigError(
            f"data.max_seq_len={seq} must be a multiple of 2 x parallel.cp = {2 * cp} (each row is cut "
            f"into {2 * cp} equal chunks); set data.max_seq_len={fits or 2 * cp} or {fits + 2 * cp}"
        )
    if cp > 1 and cfg.model.attn_backend not in ("auto", "blockwise"):
        raise ConfigError(
            f"model.attn_backend={cfg.model.attn_backend!r} has no context-parallel path; with "
            f"parallel.cp={cp} use model.attn_backend=blockwise (auto picks it)"
        )


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, key)
    origin = get_origin(typ)
    if origin in (tuple, list) and value is not None and not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"{key}={value!r} must be a list {type_text(typ)}, not a {type(value).__name__}; "
            f"give it in brackets: {key}=[...]"
        )
    if origin is dict and value is not None and not isinstance(value, dict):
        raise ConfigError(
            f"{key}={value!r} must be a mapping, not a {type(value).__name__}; e.g. {key}={{name: value}}"
        )
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
    gone = [f"{prefix}.{k}" for k in unknown if f"{prefix}.{k}" in REMOVED_KEYS]
    if gone:
        raise ConfigError(f"{gone[0]} is no longer a config key: {REMOVED_KEYS[gone[0]]}")
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"did you mean {where + close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; {hint}"
            f"valid keys under {prefix or 'the top level'}: {sorted(names)}"
        )
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def build_config(values: dict[str, Any], *, quiet: bool = False) -> TrainConfig:
    """A plain dict (e.g. `OmegaConf.to_container(cfg, resolve=True)`) -> validated TrainConfig. What
    validation adjusted is logged as a warning (unless `quiet`). A local model.path is made absolute, so
    the checkpoints and exports that record it work from any directory; a hub id stays as given."""
    values = {k: v for k, v in values.items() if k != "hydra"}
    cfg = _build(TrainConfig, values, "")
    for note in validate(cfg):
        if not quiet:
            logging.getLogger(__name__).warning("%s", note)
    if cfg.model.path is not None and Path(cfg.model.path).expanduser().exists():
        cfg.model.path = os.path.abspath(os.path.expanduser(cfg.model.path))
    return cfg


def config_of_checkpoint(values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a checkpoint's meta.json recorded. Keys removed since it was written are dropped when
    they hold the only value they ever allowed (parallel.tp=1, parallel.pp=1, optim.shard_state=false)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for key, inert in _REMOVED_DEFAULTS.items():
        section, name = key.split(".")
        if values.get(section, {}).get(name, inert) == inert:
            values.get(section, {}).pop(name, None)
    return build_config(values, quiet=True)
