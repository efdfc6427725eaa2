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
registered under `...mlp.experts.lora.*` so that the expert gradient sync treats them as expert
parameters. With `share_expert_adapters` a single A [in, r], B [r, out] serves every expert; as it
learns from the tokens of every rank's experts it is a dense parameter, registered on the MoE block
(`...mlp.shared_expert_lora.*`) where the dense gradient sync reaches it, and only referenced by the
wrapper.

Every base parameter is frozen (requires_grad False): autograd computes and stores no gradient for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.gpt_oss.config import ConfigError
from engine.moe.backends import ExpertAdapters
from engine.moe.experts import EXPERT_PARAMS, GroupedExperts, compute_weights, recast_in_backward
from engine.peft.config import ATTENTION_TARGETS, EXPERT_TARGETS, LoraConfig

_SHORT = {"gate_up_proj": "gate_up", "down_proj": "down"}  # parameter name stems inside ExpertLoRA


def _draw_a(shape: tuple[int, ...], fan_in: int, cfg: LoraConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.init == "kaiming":  # what nn.Linear and peft use: uniform(+-1/sqrt(fan_in))
        return (torch.rand(shape, generator=gen) * 2 - 1) / fan_in**0.5
    return torch.randn(shape, generator=gen) / cfg.rank


@torch.no_grad()
def _fold(w: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scale: float) -> None:
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
        _fold(self.weight, self.lora_B, self.lora_A, sign * self.scaling)  # [out, r] @ [r, in]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.cfg.rank}, merged={self.merged}"


class ExpertLoRA(nn.Module):
    """Adapters for the expert projections of one MoE layer: per expert, or one shared by all (`shared`)."""

    def __init__(self, experts: GroupedExperts, projections: list[str], cfg: LoraConfig, shared: bool):
        super().__init__()
        self.projections, self.shared = tuple(projections), shared
        self.cfg, self.scaling, self.merged = cfg, cfg.scaling, False
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        lead = () if shared else (experts.num_experts,)
        for proj in self.projections:
            w = getattr(experts, proj)  # [E, in, out]
            kw = dict(dtype=w.dtype, device=w.device)
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
        for proj in self.projections:
            w, (a, b) = getattr(experts, proj), self.factors(proj)
            for e in range(w.shape[0]):  # one expert at a time: a temporary of one expert's size
                _fold(w[e], a if self.shared else a[e], b if self.shared else b[e], sign * self.scaling)

    def extra_repr(self) -> str:
        kind = "shared" if self.shared else "per expert"
        return f"{', '.join(self.projections)}, rank={self.cfg.rank}, {kind}, merged={self.merged}"


class LoraExperts(nn.Module):
    """GroupedExperts plus low-rank adapters; the experts' parameters are taken over, not copied."""

    def __init__(self, base: GroupedExperts, lora: ExpertLoRA, register_lora: bool = True):
        super().__init__()
        for name in EXPERT_PARAMS:
            setattr(self, name, getattr(base, name))
        self.total_experts, self.num_experts = base.total_experts, base.num_experts
        self.expert_offset = base.expert_offset
        self.alpha, self.limit, self.backend = base.alpha, base.limit, base.backend
        if register_lora:
            self.lora = lora  # named ...experts.lora.*: an expert parameter
        else:
            object.__setattr__(self, "lora", lora)  # shared: registered on the MoE block, referenced here

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gather_idx: torch.Tensor | None = None) -> torch.Tensor:
        """As GroupedExperts.forward, with each adapted projection's output x W + scaling * (x A) B."""
        x, weights = compute_weights(self, x)
        with recast_in_backward(self, weights):
            if self.lora.merged:
                return self.backend.mlp(x, counts, *weights, alpha=self.alpha, limit=self.limit, gather_idx=gather_idx)
            return self.backend.lora_mlp(x, counts, *weights, self.lora.adapters(), alpha=self.alpha,
                                         limit=self.limit, gather_idx=gather_idx)

    def extra_repr(self) -> str:
        e, h, i2 = self.gate_up_proj.shape
        return f"experts={e} (offset {self.expert_offset}), hidden={h}, intermediate={i2 // 2}, backend={self.backend}"


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _targets(model: nn.Module, cfg: LoraConfig) -> tuple[set[str], dict[str, nn.Linear], dict[str, GroupedExperts]]:
    """The names (module names; `<experts>.<param>` for experts) the patterns select, and the candidates."""
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in ATTENTION_TARGETS}
    experts = {n: m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    candidates = list(linears) + [f"{n}.{p}" for n in experts for p in EXPERT_TARGETS]
    if not candidates:
        raise ConfigError(f"this model has none of {list(ATTENTION_TARGETS + EXPERT_TARGETS)}; LoRA cannot adapt it")
    chosen: set[str] = set()
    for pattern in cfg.target_modules:
        hits = [c for c in candidates if _matches(c, pattern)]
        if not hits:
            raise ConfigError(
                f"peft.target_modules entry {pattern!r} matches no weight of this model. LoRA adapts "
                f"{list(ATTENTION_TARGETS + EXPERT_TARGETS)}, optionally with a module path prefix "
                f"(e.g. {candidates[0]!r} or {candidates[-1]!r})")
        chosen.update(hits)
    return chosen, linears, experts


def apply_lora(model: nn.Module, cfg: LoraConfig, *, seed: int = 0) -> dict:
    """Freeze `model` and add the adapters `cfg` selects; returns the startup report (engine.peft.report).

    A is drawn from a generator seeded with `seed`, in module order and at the full model's expert
    count, so every rank of any expert-parallel layout gets the same adapters as a single process."""
    from engine.peft.report import lora_report

    cfg.validate()
    if any(True for _ in adapter_modules(model)):
        raise RuntimeError("LoRA is already applied to this model")
    chosen, linears, experts = _targets(model, cfg)
    for name, ex in experts.items():
        if ex.backend.name == "grouped_mm" and any(name + "." + p in chosen for p in EXPERT_TARGETS):
            itemsize = ex.gate_up_proj.element_size()
            if cfg.rank * itemsize % 16:
                raise ConfigError(f"peft.rank={cfg.rank} with model.experts_backend=grouped_mm: torch._grouped_mm "
                                  f"needs 16-byte aligned rows; use a rank that is a multiple of {16 // itemsize}")
    for p in model.parameters():
        p.requires_grad_(False)

    gen = torch.Generator().manual_seed(seed)
    for name in [n for n, _ in model.named_modules()]:
        parent_name, _, child = name.rpartition(".")
        if name in linears and name in chosen:
            lora = LoraLinear(linears[name], cfg).train(linears[name].training)  # new modules default to train
            if not lora.lora_A.is_meta:
                lora.lora_A.data.copy_(_draw_a(tuple(lora.lora_A.shape), lora.in_features, cfg, gen))
            setattr(model.get_submodule(parent_name), child, lora)
        elif name in experts:
            ex = experts[name]
            projs = [p for p in EXPERT_TARGETS if f"{name}.{p}" in chosen]
            if projs:
                wrapped = _wrap_experts(model.get_submodule(parent_name), ex, projs, cfg, gen)
                setattr(model.get_submodule(parent_name), child, wrapped)
    return lora_report(model)


def _wrap_experts(block, experts, projs, cfg, gen) -> LoraExperts:
    shared = cfg.share_expert_adapters
    lora = ExpertLoRA(experts, projs, cfg, shared=shared).train(experts.training)
    for proj in projs:
        a, _ = lora.factors(proj)
        if a.is_meta:
            continue
        fan_in = a.shape[-2]
        if shared:
            a.data.copy_(_draw_a(tuple(a.shape), fan_in, cfg, gen))
        else:  # draw every expert's A, keep this rank's: the same adapters whatever the EP layout
            n, off = experts.num_experts, experts.expert_offset
            full = _draw_a((experts.total_experts, *a.shape[1:]), fan_in, cfg, gen)
            a.data.copy_(full[off : off + n])
    if shared:
        block.shared_expert_lora = lora  # registered here: a dense parameter (see the module docstring)
    return LoraExperts(experts, lora, register_lora=not shared).train(experts.training)


def adapter_modules(model: nn.Module):
    """Yield (module name, adapter, base) for every adapter: base is the LoraLinear itself or the
    LoraExperts an ExpertLoRA serves."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m, m
        elif isinstance(m, LoraExperts):
            yield name, m.lora, m


def _adapters_or_raise(model: nn.Module) -> list:
    found = list(adapter_modules(model))
    if not found:
        raise RuntimeError("this model has no LoRA adapters; call engine.peft.apply_lora first")
    return found


def _set_merged(model: nn.Module, merged: bool) -> None:
    for _, adapter, base in _adapters_or_raise(model):
        if adapter.merged == merged:
            raise RuntimeError(f"LoRA is already {'merged' if merged else 'unmerged'}")
        if isinstance(adapter, LoraLinear):
            adapter.fold(1 if merged else -1)
        else:
            adapter.fold(base, 1 if merged else -1)
        adapter.merged = merged


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scaling A B); the forward then skips the adapters."""
    _set_merged(model, True)


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (W -= scaling A B): the base weights back up to one rounding of the weight dtype."""
    _set_merged(model, False)


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for _, adapter, _ in _adapters_or_raise(model):
        params = (adapter.lora_A, adapter.lora_B) if isinstance(adapter, LoraLinear) else adapter.parameters()
        ids.update(id(p) for p in params)
    return ids


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by parameter name (e.g. `model.layers.0.self_attn.q_proj.lora_A`,
    `model.layers.0.mlp.experts.lora.gate_up_A`). Under expert parallelism the per-expert tensors are
    this rank's slice: same names on every rank, rows from `expert_offset`."""
    ids = _adapter_param_ids(model)
    return {n: p.detach() for n, p in model.named_parameters() if id(p) in ids}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by lora_state_dict into the adapters; names and shapes must match exactly."""
    own = lora_state_dict(model)
    if any(a.merged for _, a, _ in adapter_modules(model)):
        raise RuntimeError("cannot load adapters into a merged model; call unmerge_lora first")
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"LoRA state dict does not match the model's adapters: missing {missing[:4]}"
                       f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                       f"{' ...' if len(unexpected) > 4 else ''} (was it saved with the same peft.target_modules "
                       "and peft.share_expert_adapters?)")
    for name, p in own.items():
        if tuple(sd[name].shape) != tuple(p.shape):
            raise ValueError(f"LoRA tensor {name}: saved shape {tuple(sd[name].shape)} != model's {tuple(p.shape)} "
                             "(different peft.rank or expert-parallel slice?)")
        p.copy_(sd[name])
