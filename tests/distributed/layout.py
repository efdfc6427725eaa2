"""How a global batch is spread over ranks and micro-batches, for the multi-process tests' own batches
(the trainer's data loaders split the global batch themselves, engine/data/loader.py).

`data.global_batch_size` (sequences per optimizer step) is fixed whatever the world size, so a run
on 1, 4 or 8 GPUs takes the same optimizer steps. Every rank is a data-parallel rank for the dense
weights (even with EP = world, each rank runs its own tokens through attention and only the expert
MLPs are shared), so rank r takes the r-th contiguous slice of each global batch and walks it in
micro-batches, accumulating gradients:

    global_batch = world * micro_batch * grad_accum_steps

With the loss divided by the global token count (engine.parallel.grad_sync), the summed gradients
do not depend on how the batch was cut.
"""

from __future__ import annotations


def _positive(key: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer")


def micro_batches_for(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient-accumulation steps per optimizer step: global_batch / (micro_batch * world)."""
    _positive("data.global_batch_size", global_batch)
    _positive("data.micro_batch_size", micro_batch)
    _positive("world size", world)
    per_step = micro_batch * world
    if global_batch % per_step:
        fits = [m for m in range(1, global_batch // world + 1) if global_batch % (m * world) == 0]
        hint = (
            f"choose data.micro_batch_size in {fits}"
            if fits
            else f"data.global_batch_size must be a multiple of the world size {world}"
        )
        raise ValueError(
            f"data.global_batch_size={global_batch} is not divisible by data.micro_batch_size="
            f"{micro_batch} x world size {world} = {per_step}; {hint}"
        )
    return global_batch // per_step


def rank_slice(global_batch: int, rank: int, world: int) -> slice:
    """The sequences of each global batch that rank `rank` processes: a contiguous 1/world share."""
    _positive("data.global_batch_size", global_batch)
    _positive("world size", world)
    if global_batch % world:
        raise ValueError(f"data.global_batch_size={global_batch} must be a multiple of the world size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    share = global_batch // world
    return slice(rank * share, (rank + 1) * share)


def is_expert_param(name: str) -> bool:
    """The tests' own reading of the HF names: expert tensors, and the adapters inside an experts module,
    live under `.experts.` (the engine reads tags instead, engine/parallel/placement.py)."""
    return ".experts." in f".{name}"


def expert_range(mesh, num_experts: int) -> range:
    """Global expert ids owned by this rank of `mesh`."""
    local = num_experts // mesh.ep
    return range(mesh.ep_rank * local, (mesh.ep_rank + 1) * local)
