"""Where a parameter lives across ranks, read from tags set when the model is built, never from names.

A module whose `holds_experts` attribute is true (engine.moe.experts.GroupedExperts, and the LoRA
modules that wrap or adapt it, engine.peft.adapters) holds expert tensors: dim 0 is the experts, split
over the `ep` ranks of an expert-parallel group, and their gradients are summed over expert-DP. Every
other parameter is dense: replicated on every rank, its gradient summed over the world. The tag sits on
the module rather than on the parameter because FSDP2 replaces parameters with sharded ones.
"""

from __future__ import annotations

from torch import nn


def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "holds_experts", False)]


def expert_param_ids(model: nn.Module) -> set[int]:
    """id() of every expert parameter (what `holds_experts` modules register directly)."""
    return {id(p) for m in expert_modules(model) for p in m.parameters(recurse=False)}


def named_params(model: nn.Module, *, experts: bool, trainable: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the expert (or dense) parameters, only those with requires_grad if `trainable`."""
    ids = expert_param_ids(model)
    return [
        (n, p) for n, p in model.named_parameters() if (id(p) in ids) == experts and (p.requires_grad or not trainable)
    ]


def placement(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> True for an expert parameter, False for a dense one."""
    ids = expert_param_ids(model)
    return {n: id(p) in ids for n, p in model.named_parameters()}
