"""LoRA settings (`peft.*` in the training config), validated once with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config.schema import Range, bounds, choices, setting
from engine.errors import ConfigError

# The weights LoRA can adapt, by their HF module / parameter name.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("gate_up_proj", "down_proj")
LORA_INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    rank: int = setting(32, range=Range(1), help="the adapters' rank (typically 8 to 64)")
    alpha: float = setting(
        32.0,
        range=Range(0, low_open=True),
        help="scaling numerator: the update is alpha / rank (or alpha / sqrt(rank)) times B A",
    )
    dropout: float = setting(
        0.0, range=Range(0, 1, high_open=True), help="dropout on the adapter's input only; the base path never sees it"
    )
    use_rslora: bool = setting(False, help="scale by alpha / sqrt(rank) instead of alpha / rank")
    target_modules: list[str] = setting(
        factory=lambda: list(ATTENTION_TARGETS + EXPERT_TARGETS),
        help=f"weights to adapt, each a name or a name's ending: {', '.join(ATTENTION_TARGETS + EXPERT_TARGETS)} "
        "(every layer's), or e.g. layers.3.self_attn.q_proj (layer 3's only)",
    )
    share_expert_adapters: bool = setting(
        False,
        help="one adapter per layer for all experts instead of one per expert (E times fewer expert adapter weights)",
    )
    init: str = setting(
        "kaiming",
        choices=LORA_INITS,
        help="A's init: kaiming (uniform +-1/sqrt(fan_in), as "
        "nn.Linear and peft) or gaussian (normal, std 1/rank); B starts at zero",
    )

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def validate(self) -> "LoraConfig":
        if not isinstance(self.rank, int) or not bounds(LoraConfig, "rank").holds(self.rank):
            raise ConfigError(f"peft.rank={self.rank!r} must be a positive integer (typically 8 to 64)")
        if not bounds(LoraConfig, "alpha").holds(self.alpha):
            raise ConfigError(f"peft.alpha={self.alpha!r} must be a positive number (typically rank or 2 * rank)")
        if not bounds(LoraConfig, "dropout").holds(self.dropout):
            raise ConfigError(f"peft.dropout={self.dropout!r} must be {bounds(LoraConfig, 'dropout').text(False)}")
        for key in ("use_rslora", "share_expert_adapters"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"peft.{key}={getattr(self, key)!r} must be true or false")
        inits = choices(LoraConfig, "init")
        if self.init not in inits:
            raise ConfigError(f"peft.init={self.init!r} is not allowed; choose one of {list(inits)}")
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t.strip(".") for t in targets):
            raise ConfigError(
                f"peft.target_modules={targets!r} must be a non-empty list of names, chosen from "
                f"{list(ATTENTION_TARGETS + EXPERT_TARGETS)} (optionally with a module path prefix)"
            )
        return self
