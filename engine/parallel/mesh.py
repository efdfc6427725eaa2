"""The process layout of a run: world, data-parallel, expert-parallel, expert-data-parallel and
context-parallel groups.

Ranks form a grid [edp, ep] with the expert-parallel index fastest:

    rank = edp_rank * ep + ep_rank

so an EP group is `ep` consecutive ranks (on GPUs: the NVLink island of one node, where the
all-to-all is cheap) and an expert-data-parallel (expert-DP) group holds the ranks that own the
same experts in different EP groups. Dense weights (attention, norms, router, embeddings) are
replicated on every rank, so their data-parallel group is the whole world.

    world 4, ep 2:  EP groups {0,1} {2,3}   expert-DP groups {0,2} {1,3}   dense DP group {0,1,2,3}
    world 4, ep 4:  EP group  {0,1,2,3}     expert-DP groups {0} {1} {2} {3}
    world 4, ep 1:  EP groups {0} ... {3}   expert-DP group  {0,1,2,3}

Context parallelism (`parallel.cp`, engine.parallel.context_parallel) is a second, independent
split of the same ranks, also consecutive:

    rank = data_rank * cp + cp_rank

The `cp` ranks of a CP group read the SAME rows (the data is sliced over data_size = world / cp
data ranks) and each keeps its two chunks of every row. No parameter lives differently under CP:
each rank still holds its own tokens (chunks instead of rows), so the dense weights' gradients are
summed over the whole world and the experts' over expert-DP exactly as without CP, and the MoE
dispatch of an EP group sees whatever tokens its ranks hold.

    world 4, cp 2, ep 2:  CP groups {0,1} {2,3} (rows: data ranks 0 and 1)   EP groups {0,1} {2,3}
    world 4, cp 2, ep 1:  CP groups {0,1} {2,3}   expert-DP group {0,1,2,3}
    world 4, cp 4:        one CP group: every rank reads the same rows

The layout is checked on every rank before any collective, so a bad layout fails everywhere with
the same message instead of leaving some ranks waiting in a collective. The mesh is passed
explicitly to whatever needs it; there is no module-level parallel state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from engine.errors import LayoutError  # noqa: F401  (re-exported)

SUPPORTED = (
    "supported layouts: data parallel over all ranks for the dense weights, with expert "
    "parallelism parallel.ep dividing both the world size and the number of experts "
    "(parallel.tp=1, parallel.pp=1)"
)


def _divisors_of_both(a: int, b: int | None) -> list[int]:
    return [d for d in range(1, a + 1) if a % d == 0 and (b is None or b % d == 0)]


def check_layout(
    world_size: int, ep: int, tp: int = 1, pp: int = 1, num_experts: int | None = None, cp: int = 1
) -> None:
    """Raise LayoutError unless (world_size, ep, tp, pp, num_experts, cp) is a layout we can run."""
    for key, value in (("parallel.ep", ep), ("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayoutError(f"{key}={value!r} must be a positive integer")
    if tp > 1 and ep > 1:
        raise LayoutError(
            f"parallel.tp={tp} with parallel.ep={ep}: tensor parallelism must be 1 when expert "
            f"parallelism is used; {SUPPORTED}"
        )
    if tp > 1:
        raise LayoutError(f"parallel.tp={tp}: tensor parallelism is not implemented; {SUPPORTED}")
    if pp > 1:
        raise LayoutError(f"parallel.pp={pp}: pipeline parallelism is not implemented; {SUPPORTED}")
    choices = _divisors_of_both(world_size, num_experts)
    if world_size % ep:
        how = "run with torchrun --nproc_per_node N" if world_size == 1 else "the world size is the number of processes"
        raise LayoutError(
            f"parallel.ep={ep} does not divide the world size {world_size} ({how}); choose parallel.ep in {choices}"
        )
    if num_experts is not None and num_experts % ep:
        raise LayoutError(
            f"parallel.ep={ep} does not divide the number of experts ({num_experts}); choose parallel.ep in {choices}"
        )
    if world_size % cp:
        how = "run with torchrun --nproc_per_node N" if world_size == 1 else "each CP group is cp ranks"
        raise LayoutError(
            f"parallel.cp={cp} does not divide the world size {world_size} ({how}); "
            f"choose parallel.cp in {_divisors_of_both(world_size, None)}"
        )


@dataclass(frozen=True, eq=False)
class Mesh:
    world_size: int
    rank: int
    ep: int
    device: torch.device
    cp: int = 1
    # None when the group has one rank or when running without torch.distributed.
    ep_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    # torch DeviceMeshes over the same grid, what DTensor, FSDP2 and the checkpoints speak (None without
    # torch.distributed): dims ("ep", "edp") (expert tensors are split over ep, then over expert-DP),
    # and the whole world as one dim ("dp", the dense weights' data-parallel group).
    device_mesh: DeviceMesh | None = None
    world_mesh: DeviceMesh | None = None
    # A group of its own for checkpoint collectives: an async save runs them in a background thread,
    # which must not share a communicator with the training step's collectives.
    ckpt_group: dist.ProcessGroup | None = None

    # ------------------------------------------------------------------ coordinates
    @property
    def ep_rank(self) -> int:
        """Which slice of the experts this rank owns (pass to ModelOptions(ep_rank=...))."""
        return self.rank % self.ep

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def cp_rank(self) -> int:
        """Which two chunks of each row this rank keeps (engine.parallel.context_parallel)."""
        return self.rank % self.cp

    @property
    def data_size(self) -> int:
        """How many ways the rows of a global batch are split: world / cp (the CP ranks share rows)."""
        return self.world_size // self.cp

    @property
    def data_rank(self) -> int:
        """Which slice of the global batch's rows this rank reads (the same for a whole CP group)."""
        return self.rank // self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        cp = f"cp={self.cp} (rank {self.cp_rank}), " if self.cp > 1 else ""
        return (
            f"Mesh(world={self.world_size}, rank={self.rank}, ep={self.ep} (rank {self.ep_rank}), "
            f"expert_dp={self.edp_size} (rank {self.edp_rank}), {cp}device={self.device})"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls, device: torch.device | str = "auto") -> "Mesh":
        """One process, no torch.distributed: every collective in engine.parallel becomes a no-op."""
        return cls(world_size=1, rank=0, ep=1, device=_resolve_device(device, 0))

    @classmethod
    def from_env(
        cls,
        ep: int = 1,
        tp: int = 1,
        pp: int = 1,
        num_experts: int | None = None,
        timeout_s: float = 600.0,
        device: torch.device | str = "auto",
        backend: str | None = None,
        cp: int = 1,
    ) -> "Mesh":
        """Build the mesh from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

        Without WORLD_SIZE: a single process (ep must then be 1). With a process group already
        initialised, that one is used as the world (its timeout is whatever it was created with).
        Otherwise the group is initialised here: NCCL on GPUs, gloo on CPU. `device`: "auto" (this
        rank's GPU, cuda:LOCAL_RANK, when CUDA is available, else the CPU), "cuda" or "cpu".
        `timeout_s` bounds every collective: if a rank dies or stalls, the others raise within it
        instead of waiting forever (NCCL: the watchdog aborts the communicator, gloo: the op raises).
        """
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size = _env_int("WORLD_SIZE", 1)
            rank = _env_int("RANK", 0)
        # Check before the first collective (init_process_group is one): every rank has the same
        # arguments, so every rank raises the same error and none is left waiting.
        check_layout(world_size, ep, tp, pp, num_experts, cp)
        if world_size == 1 and not dist.is_initialized():
            return cls.single(device)

        device = _resolve_device(device, _env_int("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            backend = backend or ("nccl" if device.type == "cuda" else "gloo")
            # device_id binds NCCL to this rank's GPU at once (no guessing from the current device).
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
            )

        # new_group is collective over the whole world: every rank creates every group, in the same order.
        edp = world_size // ep
        ep_group = _own_group([list(range(i * ep, (i + 1) * ep)) for i in range(edp)], rank, timeout)
        edp_group = _own_group([list(range(j, world_size, ep)) for j in range(ep)], rank, timeout)
        cp_group = _own_group([list(range(i * cp, (i + 1) * cp)) for i in range(world_size // cp)], rank, timeout)
        grid = torch.arange(world_size).reshape(edp, ep).T  # [ep, edp]: grid[j, i] = i * ep + j
        device_mesh = DeviceMesh(device.type, grid, mesh_dim_names=("ep", "edp"))
        world_mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
        ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        return cls(
            world_size=world_size,
            rank=rank,
            ep=ep,
            device=device,
            cp=cp,
            ep_group=ep_group,
            cp_group=cp_group,
            edp_group=edp_group,
            dp_group=dist.group.WORLD,
            device_mesh=device_mesh,
            world_mesh=world_mesh,
            ckpt_group=ckpt_group,
        )

    def destroy(self) -> None:
        """Tear the process group down (a clean exit; NCCL warns when it is skipped)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LayoutError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def _resolve_device(device: torch.device | str, local_rank: int) -> torch.device:
    kind = torch.device(device).type if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LayoutError("device cuda was asked for but no CUDA device is visible; use the CPU (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise LayoutError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                f"visible; start at most that many processes per node"
            )
        return torch.device("cuda", local_rank)
    if kind != "cpu":
        raise LayoutError(f"device {device!r} is not supported; use auto, cuda or cpu")
    return torch.device("cpu")


def _own_group(partition: list[list[int]], rank: int, timeout: timedelta) -> dist.ProcessGroup | None:
    """Create every group of `partition` (collective: every rank creates them all, in the same order) and
    return the one holding `rank`: None for groups of one rank, the world's group for a single group."""
    if len(partition[0]) == 1:
        return None
    if len(partition) == 1:
        return dist.group.WORLD
    mine = None
    for ranks in partition:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine
