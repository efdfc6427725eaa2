"""`parallelize(model, mesh, ...)`: the one place a built model becomes distributed, in this order.

1. expert parallelism: every MoE block keeps this rank's slice of the experts (on the meta device, before
   any memory is taken) and gets the all-to-all dispatcher (engine.moe.alltoall);
2. `materialize(model)`: the caller's weights (read or initialised: only this rank's expert rows exist
   by then) and adapters (LoRA);
3. activation checkpointing of the chosen decoder layers;
4. FSDP2 (engine.parallel.fsdp) over the ranks holding copies of the same weights.

Context parallelism changes no weight and no module: it is a context entered around the forward
(`with cp:`, engine.parallel.context_parallel), so it is not applied here. Which parameters are experts
is read from tags set when the model is built (engine.parallel.placement).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.moe.alltoall import AllToAllDispatcher
from engine.moe.experts import shard_experts
from engine.parallel.fsdp import apply_fsdp


def apply_expert_parallel(model, mesh) -> int:
    """Spread the experts of every MoE block of `model` over the mesh's `ep` ranks: keep this rank's slice
    of each experts module (free on the meta device; a module already holding that slice is kept) and
    install the all-to-all dispatcher. Returns the number of blocks changed (0 when mesh.ep == 1)."""
    if mesh.ep == 1:
        return 0
    blocks = model.moe_blocks()
    for block in blocks:
        shard_experts(block.experts, mesh.ep, mesh.ep_rank)
        block.dispatcher = AllToAllDispatcher(mesh.ep_group, mesh.ep, mesh.ep_rank, block.router.num_experts)
    return len(blocks)


def apply_activation_checkpointing(model, layers: bool | list[int]) -> None:
    """Recompute the chosen decoder layers' activations in the backward (True = all layers, False = none)."""
    n = len(model.model.layers)
    chosen = set(range(n)) if layers is True else set() if layers is False else set(layers)
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise ValueError(f"activation checkpointing: layer indices {bad} out of range [0, {n})")
    for i, layer in enumerate(model.model.layers):
        layer.activation_checkpointing = i in chosen


def parallelize(
    model: nn.Module,
    mesh,
    *,
    materialize: Callable[[nn.Module], nn.Module] | None = None,
    activation_checkpointing: bool | list[int] = False,
    shard: str = "none",
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Apply the steps of the module docstring to `model` (built on the meta device when `materialize`
    gives it its weights) and return it. `shard`: parallel.shard (none | optimizer | full)."""
    apply_expert_parallel(model, mesh)
    if materialize is not None:
        model = materialize(model)
    apply_activation_checkpointing(model, activation_checkpointing)
    apply_fsdp(model, mesh, shard, compute_dtype)
    return model
