"""Data, expert and context parallelism: the process mesh, gradient sync, FSDP2 and `parallelize`.

The expert-parallel dispatcher itself lives with the MoE code: engine.moe.alltoall
(`AllToAllDispatcher`), installed by engine.parallel.parallelize.
"""

from engine.parallel.grad_sync import clip_grad_norm, global_grad_norm, global_token_count, sync_gradients
from engine.parallel.mesh import LayoutError, Mesh, check_layout

__all__ = [
    "Mesh",
    "LayoutError",
    "check_layout",
    "sync_gradients",
    "global_grad_norm",
    "clip_grad_norm",
    "global_token_count",
]
