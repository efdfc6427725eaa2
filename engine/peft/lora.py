"""LoRA on GPT-OSS: `apply_lora` wraps the attention projections and the experts the patterns select in
the adapters of engine/peft/adapters.py (every base parameter frozen) and returns the startup report
(engine/peft/report.py); `merge_lora` / `unmerge_lora` fold them in and out; `lora_state_dict` is the
adapters alone.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import ConfigError
from engine.moe.experts import GroupedExperts
from engine.peft.adapters import ExpertLoRA, LoraExperts, LoraLinear, adapter_modules, draw_a
from engine.peft.config import ATTENTION_TARGETS, EXPERT_TARGETS, LoraConfig
from engine.peft.report import lora_report


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _targets(model: nn.Module, cfg: LoraConfig) -> tuple[set[str], dict[str, nn.Linear], dict[str, GroupedExperts]]:
    """The names (module names; `<experts>.<param>` for experts) the patterns select, and the candidates."""
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in ATTENTION_TARGETS
    }
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
                f"(e.g. {candidates[0]!r} or {candidates[-1]!r})"
            )
        chosen.update(hits)
    return chosen, linears, experts


def apply_lora(model: nn.Module, cfg: LoraConfig, *, seed: int = 0) -> dict:
    """Freeze `model` and add the adapters `cfg` selects; returns the startup report (engine.peft.report).

    A is drawn from a generator seeded with `seed`, in module order and at the full model's expert
    count, so every rank of any expert-parallel layout gets the same adapters as a single process."""
    cfg.validate()
    if any(True for _ in adapter_modules(model)):
        raise RuntimeError("LoRA is already applied to this model")
    chosen, linears, experts = _targets(model, cfg)
    for name, ex in experts.items():
        if ex.backend.name == "grouped_mm" and any(name + "." + p in chosen for p in EXPERT_TARGETS):
            itemsize = ex.gate_up_proj_bias.element_size()
            if cfg.rank * itemsize % 16:
                raise ConfigError(
                    f"peft.rank={cfg.rank} with model.experts_backend=grouped_mm: torch._grouped_mm "
                    f"needs 16-byte aligned rows; use a rank that is a multiple of {16 // itemsize}"
                )
    for p in model.parameters():
        p.requires_grad_(False)

    gen = torch.Generator().manual_seed(seed)
    for name in [n for n, _ in model.named_modules()]:
        parent_name, _, child = name.rpartition(".")
        if name in linears and name in chosen:
            lora = LoraLinear(linears[name], cfg).train(linears[name].training)  # new modules default to train
            if not lora.lora_A.is_meta:
                lora.lora_A.data.copy_(draw_a(tuple(lora.lora_A.shape), lora.in_features, cfg, gen))
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
            a.data.copy_(draw_a(tuple(a.shape), fan_in, cfg, gen))
        else:  # draw every expert's A, keep this rank's: the same adapters whatever the EP layout
            n, off = experts.num_experts, experts.expert_offset
            full = draw_a((experts.total_experts, *a.shape[1:]), fan_in, cfg, gen)
            a.data.copy_(full[off : off + n])
    if shared:
        block.shared_expert_lora = lora  # registered here: a dense parameter (see the module docstring)
    return LoraExperts(experts, lora, register_lora=not shared).train(experts.training)


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
