"""LoRA settings (`peft.*` in the training config), validated once with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.gpt_oss.config import ConfigError

# The weights LoRA can adapt, by their HF module / parameter name.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("gate_up_proj", "down_proj")
LORA_INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0  # on the adapter's input only; the base path never sees it
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    # Each entry selects the weights whose name is it or ends with "." + it: "q_proj" adapts every
    # layer's q_proj, "layers.3.self_attn.q_proj" only layer 3's, "mlp.experts.down_proj" every down_proj.
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS + EXPERT_TARGETS))
    # One adapter per layer for all experts instead of one per expert (E times fewer expert adapter weights).
    share_expert_adapters: bool = False
    # A's init ("kaiming": uniform +-1/sqrt(fan_in) as nn.Linear and peft; "gaussian": normal std 1/rank); B is zero.
    init: str = "kaiming"

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def validate(self) -> "LoraConfig":
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"peft.rank={self.rank!r} must be a positive integer (typically 8 to 64)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"peft.alpha={self.alpha!r} must be a positive number (typically rank or 2 * rank)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout={self.dropout!r} must be a number in [0, 1)")
        for key in ("use_rslora", "share_expert_adapters"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"peft.{key}={getattr(self, key)!r} must be true or false")
        if self.init not in LORA_INITS:
            raise ConfigError(f"peft.init={self.init!r} is not allowed; choose one of {list(LORA_INITS)}")
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t.strip(".") for t in targets):
            raise ConfigError(f"peft.target_modules={targets!r} must be a non-empty list of names, chosen from "
                              f"{list(ATTENTION_TARGETS + EXPERT_TARGETS)} (optionally with a module path prefix)")
        return self
