"""LoRA for GPT-OSS: low-rank adapters on the attention projections and on the experts.

    y = x W + scaling * dropout(x) A B      A [in, r] random, B [r, out] zero, so training starts at the base

Attention projections (nn.Linear) become `LoraLinear`, which takes over the Linear's own `weight`
and `bias` (same names, so checkpoints and the HF export see the usual keys) and adds `lora_A`
[r, in] and `lora_B` [out, r] (nn.Linear orientation, as peft stores them).

Experts (GroupedExperts) become `LoraExperts`, a wrapper that, like LoraLinear, takes over the
experts' own parameters (same names) and adds an `ExpertLoRA` holding, per adapted projection,
A [E, in, r] and B [E, r, out]. The experts' backend computes the adapted MLP (`lora_mlp`): the
Triton backend accumulates the adapter's product inside the expert GEMMs, before the SwiGLU epilogue;
a weight delta is never built in the forward. Under expert parallelism a rank holds the adapters of
its experts (E = E_local, rows [expert_offset, expert_offset + E_local) of the full model's),
tagged as expert tensors (`holds_experts`, engine.parallel.placement) so that the expert gradient sync
treats them as expert parameters. With `share_expert_adapters` a single A [in, r], B [r, out] serves every expert; as it
learns from the tokens of every rank's experts it is a dense parameter, registered on the MoE block
(`...mlp.shared_expert_lora.*`) where the dense gradient sync reaches it, and only referenced by the
wrapper.

Every base parameter is frozen (requires_grad False): autograd computes and stores no gradient for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.moe.backends import ExpertAdapters
from engine.moe.experts import (
    GroupedExperts,
    Mxfp4Access,
    compute_weights,
    expert_tensor_names_of,
    recast_in_backward,
)
from engine.peft.config import LoraConfig

_SHORT = {"gate_up_proj": "gate_up", "down_proj": "down"}  # parameter name stems inside ExpertLoRA


def draw_a(shape: tuple[int, ...], fan_in: int, cfg: LoraConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.init == "kaiming":  # what nn.Linear and peft use: uniform(+-1/sqrt(fan_in))
        return (torch.rand(shape, generator=gen) * 2 - 1) / fan_in**0.5
    return torch.randn(shape, generator=gen) / cfg.rank


@torch.no_grad()
def add_product(w: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scale: float) -> None:
    """w += scale * lhs @ rhs, summed in fp32 so that a bf16 merge rounds once."""
    w.copy_((w.float() + scale * (lhs.float() @ rhs.float())).to(w.dtype))


class LoraLinear(nn.Module):
    """An nn.Linear plus a low-rank adapter; the Linear's parameters are taken over, not copied."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.cfg, self.scaling, self.merged = cfg, cfg.scaling, False
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, **kw))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, **kw))  # [out, r]
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A) * self.scaling, self.lora_B)

    def fold(self, sign: int) -> None:
        add_product(self.weight, self.lora_B, self.lora_A, sign * self.scaling)  # [out, r] @ [r, in]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.cfg.rank}, merged={self.merged}"


class ExpertLoRA(nn.Module):
    """Adapters for the expert projections of one MoE layer: per expert, or one shared by all (`shared`)."""

    def __init__(self, experts: GroupedExperts, projections: list[str], cfg: LoraConfig, shared: bool):
        super().__init__()
        self.projections, self.shared = tuple(projections), shared
        self.holds_experts = not shared  # per-expert adapters are split like the experts (engine.parallel.placement)
        self.cfg, self.scaling, self.merged = cfg, cfg.scaling, False
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        lead = () if shared else (experts.num_experts,)
        for proj in self.projections:
            w = getattr(experts, proj)  # [E, in, out], dense or MXFP4 (engine.moe.experts)
            bias = getattr(experts, f"{proj}_bias")
            kw = dict(dtype=bias.dtype, device=bias.device)
            setattr(self, f"{_SHORT[proj]}_A", nn.Parameter(torch.empty(*lead, w.shape[1], cfg.rank, **kw)))
            setattr(self, f"{_SHORT[proj]}_B", nn.Parameter(torch.zeros(*lead, cfg.rank, w.shape[2], **kw)))

    def factors(self, proj: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"{_SHORT[proj]}_A"), getattr(self, f"{_SHORT[proj]}_B")

    def adapters(self) -> ExpertAdapters:
        """The factors as the experts' backend takes them (dropout only when it can act)."""
        pair = {p: self.factors(p) if p in self.projections else None for p in _SHORT}
        dropout = self.dropout if self.training and self.cfg.dropout else None
        return ExpertAdapters(pair["gate_up_proj"], pair["down_proj"], self.scaling, dropout)

    def fold(self, experts: nn.Module, sign: int) -> None:
        if getattr(experts, "packed", False):
            raise ValueError(
                "model.expert_weights=mxfp4: the adapters cannot be merged into the packed MXFP4 experts; "
                "run them unmerged, or export with --format merged (which writes dense weights)"
            )
        for proj in self.projections:
            w, (a, b) = getattr(experts, proj), self.factors(proj)
            for e in range(w.shape[0]):  # one expert at a time: a temporary of one expert's size
                add_product(w[e], a if self.shared else a[e], b if self.shared else b[e], sign * self.scaling)

    def extra_repr(self) -> str:
        kind = "shared" if self.shared else "per expert"
        return f"{', '.join(self.projections)}, rank={self.cfg.rank}, {kind}, merged={self.merged}"


class LoraExperts(Mxfp4Access, nn.Module):
    """GroupedExperts plus low-rank adapters; the experts' parameters (or MXFP4 buffers) are taken over, not
    copied."""

    holds_experts = True  # the experts' own parameters (engine.parallel.placement)

    def __init__(self, base: GroupedExperts, lora: ExpertLoRA, register_lora: bool = True):
        super().__init__()
        for name in expert_tensor_names_of(base):
            if name in base._buffers:
                self.register_buffer(name, base._buffers[name], persistent=False)
            else:
                setattr(self, name, getattr(base, name))
        self.total_experts, self.num_experts = base.total_experts, base.num_experts
        self.expert_offset = base.expert_offset
        self.alpha, self.limit, self.backend = base.alpha, base.limit, base.backend
        if register_lora:
            self.lora = lora  # ...experts.lora.*: per-expert adapters, tagged as experts
        else:
            object.__setattr__(self, "lora", lora)  # shared: registered on the MoE block, referenced here

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gather_idx: torch.Tensor | None = None) -> torch.Tensor:
        """As GroupedExperts.forward, with each adapted projection's output x W + scaling * (x A) B."""
        x, weights = compute_weights(self, x)
        with recast_in_backward(self, weights):
            if self.lora.merged:
                return self.backend.mlp(x, counts, *weights, alpha=self.alpha, limit=self.limit, gather_idx=gather_idx)
            return self.backend.lora_mlp(
                x, counts, *weights, self.lora.adapters(), alpha=self.alpha, limit=self.limit, gather_idx=gather_idx
            )

    def extra_repr(self) -> str:
        e, h, i2 = self.gate_up_proj.shape
        weights = ", mxfp4" if self.packed else ""
        return (
            f"experts={e} (offset {self.expert_offset}), hidden={h}, intermediate={i2 // 2}, "
            f"backend={self.backend}{weights}"
        )


def adapter_modules(model: nn.Module):
    """Yield (module name, adapter, base) for every adapter: base is the LoraLinear itself or the
    LoraExperts an ExpertLoRA serves."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m, m
        elif isinstance(m, LoraExperts):
            yield name, m.lora, m
