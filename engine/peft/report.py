"""The LoRA startup report: exactly which weights carry an adapter, and what training them costs.

Printed at startup because the classic LoRA failure on MoE models is silent: a module-name
mismatch leaves the experts untouched and the run trains only attention. Here every kind of
weight is counted, so "expert gate_up: 0" is visible at a glance (and a target pattern that
matches nothing is already an error in apply_lora).
"""

from __future__ import annotations

from torch import nn

from engine.errors import size_text
from engine.peft.adapters import ExpertLoRA, LoraLinear, adapter_modules

KINDS = {  # report key -> table label
    "q_proj": "attention q_proj",
    "k_proj": "attention k_proj",
    "v_proj": "attention v_proj",
    "o_proj": "attention o_proj",
    "gate_up_proj": "expert gate_up",
    "down_proj": "expert down",
}
ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq per trainable parameter
MASTER_BYTES = 4  # an fp32 master copy, kept when the adapters themselves are lower precision


def lora_report(model: nn.Module) -> dict:
    """Counts on this rank (under expert parallelism, expert counts are this rank's experts).

    adapted: per kind, how many weight tensors (one per layer) carry an adapter;
    expert_matrices: per expert kind, how many single-expert matrices those adapters cover;
    trainable_params / param_bytes: every parameter with requires_grad (only adapters after apply_lora);
    optimizer_bytes: fp32 Adam moments, plus an fp32 master copy when the adapters are bf16/fp16."""
    adapted = dict.fromkeys(KINDS, 0)
    expert_matrices = {"gate_up_proj": 0, "down_proj": 0}
    cfg, shared = None, False
    for name, adapter, base in adapter_modules(model):
        cfg = adapter.cfg
        if isinstance(adapter, LoraLinear):
            adapted[name.rpartition(".")[2]] += 1
        elif isinstance(adapter, ExpertLoRA):
            shared = adapter.shared
            for proj in adapter.projections:
                adapted[proj] += 1
                expert_matrices[proj] += base.num_experts
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    master = sum(p.numel() * MASTER_BYTES for p in trainable if p.element_size() < MASTER_BYTES)
    optimizer_bytes = n_train * ADAM_STATE_BYTES + master
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    return {
        "rank": cfg.rank if cfg else None,
        "alpha": cfg.alpha if cfg else None,
        "scaling": cfg.scaling if cfg else None,
        "shared_expert_adapters": shared,
        "adapted": adapted,
        "expert_matrices": expert_matrices,
        "trainable_params": n_train,
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "trainable_dtypes": dtypes,
        "param_bytes": param_bytes,
        "optimizer_bytes": optimizer_bytes,
        "total_bytes": param_bytes + optimizer_bytes,
    }


def format_report(r: dict) -> str:
    """The report as a short table for the startup log."""
    kind = "shared by all experts" if r["shared_expert_adapters"] else "one per expert"
    lines = [
        f"LoRA rank {r['rank']}, alpha {r['alpha']:g} (scaling {r['scaling']:.4g}), expert adapters {kind}",
        f"  {'weight':<18}{'adapted':>8}{'expert matrices':>17}",
    ]
    for key, label in KINDS.items():
        extra = f"{r['expert_matrices'][key]:>17}" if key in r["expert_matrices"] else ""
        lines.append(f"  {label:<18}{r['adapted'][key]:>8}{extra}")
    total = r["trainable_params"] + r["frozen_params"]
    share = 100 * r["trainable_params"] / total if total else 0.0
    lines += [
        f"  trainable params  {r['trainable_params']:,} ({share:.3f}% of {total:,}; "
        f"{', '.join(r['trainable_dtypes'])})",
        f"  adapter bytes     {size_text(r['param_bytes'])} + optimizer state {size_text(r['optimizer_bytes'])} "
        f"= {size_text(r['total_bytes'])}",
    ]
    return "\n".join(lines)
