"""GPT-OSS architecture config: presets (20b, 120b, tiny) and conversion from/to HF `config.json`.

Architecture fields use the HF names so a `config.json` maps one to one. Runtime choices that do
not change the weights (backends, expert-parallel slice) live in `ModelOptions`, not here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError  # noqa: F401  (re-exported: a bad config.json, preset or option)


@dataclass
class RopeScaling:
    """YaRN parameters, as in the `rope_scaling` block of GPT-OSS's config.json."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False


@dataclass
class GptOssConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    intermediate_size: int = 2880
    sliding_window: int = 128
    layer_types: list[str] | None = None  # "sliding_attention" | "full_attention"; default alternates
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    initializer_range: float = 0.02
    pad_token_id: int | None = 199999
    eos_token_id: int | list[int] | None = 200002
    bos_token_id: int | None = 199998

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.layer_types is None:
            # Even layers (0, 2, ...) use the sliding window, odd layers are full causal.
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def gpt_oss_20b(cls, **overrides: Any) -> "GptOssConfig":
        return cls(**{"num_hidden_layers": 24, "num_local_experts": 32, **overrides})

    @classmethod
    def gpt_oss_120b(cls, **overrides: Any) -> "GptOssConfig":
        return cls(**{"num_hidden_layers": 36, "num_local_experts": 128, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "GptOssConfig":
        """A laptop-sized GPT-OSS with every architectural feature of the real one."""
        base = dict(
            vocab_size=1024,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=64,
            sliding_window=16,
            max_position_embeddings=4096,
            rope_scaling=RopeScaling(original_max_position_embeddings=256),
            pad_token_id=None,
            eos_token_id=None,
            bos_token_id=None,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GptOssConfig":
        presets = {"gpt-oss-20b": cls.gpt_oss_20b, "gpt-oss-120b": cls.gpt_oss_120b, "tiny": cls.tiny}
        key = name.replace("_", "-")
        if key not in presets:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return presets[key](**overrides)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"GPT-OSS config: {key}={getattr(self, key)!r} {why}")

        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "intermediate_size",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise bad("num_experts_per_tok", f"exceeds num_local_experts={self.num_local_experts}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (rotary embedding)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise bad("layer_types", f"contains {sorted(unknown)}; allowed: sliding_attention, full_attention")
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise bad("sliding_window", "must be a positive integer when sliding_attention layers exist")

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, experts, and active per token (top-k experts; the embedding lookup
        is not a matmul and is left out of `active`, the lm_head is in)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        attn = h * self.q_width + self.q_width + 2 * (h * self.kv_width + self.kv_width)
        attn += self.q_width * h + h + self.num_attention_heads
        router = e * h + e
        expert = h * 2 * i + 2 * i + i * h + h
        per_layer_dense = attn + router + 2 * h
        embed = 2 * self.vocab_size * h
        experts = self.num_hidden_layers * e * expert
        total = embed + h + self.num_hidden_layers * per_layer_dense + experts
        active = (
            self.vocab_size * h + h + self.num_hidden_layers * (per_layer_dense + self.num_experts_per_tok * expert)
        )
        return {"total": total, "experts": experts, "active": active}

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GptOssConfig":
        model_type = d.get("model_type")
        if model_type != "gpt_oss":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'gpt_oss'; "
                "this engine loads GPT-OSS checkpoints only"
            )
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope and rope_type != "yarn":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; GPT-OSS uses 'yarn'")
        theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
        scaling = None
        if rope:
            scaling = RopeScaling(
                factor=float(rope.get("factor", 32.0)),
                beta_fast=float(rope.get("beta_fast", 32.0)),
                beta_slow=float(rope.get("beta_slow", 1.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 4096)),
                truncate=bool(rope.get("truncate", True)),
            )
        kwargs: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": scaling}
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling"}
        token_ids = {"pad_token_id", "eos_token_id", "bos_token_id"}  # null is a real value for these
        for name in names:
            if name in d and (d[name] is not None or name in token_ids):
                kwargs[name] = d[name]
        if "num_experts" in d and "num_local_experts" not in d:
            kwargs["num_local_experts"] = d["num_experts"]
        if d.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: tie_word_embeddings=true is not GPT-OSS (its lm_head is untied)")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "GptOssConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"{file}: not found; a GPT-OSS checkpoint directory must contain config.json")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_hf_dict(d, source=str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of the published checkpoints (without any quantization_config)."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }
        for f in dataclasses.fields(self):
            if f.name == "rope_scaling":
                continue
            d[f.name] = getattr(self, f.name)
        d["experts_per_token"] = self.num_experts_per_tok
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        return d


def yarn_attention_factor(cfg: GptOssConfig) -> float:
    """The cos/sin multiplier of YaRN (0.1 ln(factor) + 1), 1.0 without scaling."""
    if cfg.rope_scaling is None or cfg.rope_scaling.factor <= 1:
        return 1.0
    return 0.1 * math.log(cfg.rope_scaling.factor) + 1.0
