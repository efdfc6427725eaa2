"""What a training checkpoint holds, as global tensors keyed by name, so that any layout can read it.

    model.{fqn}           a trained weight (all weights for full fine-tuning, the adapters for LoRA)
    master.{fqn}          its fp32 master copy (optim.master_weights=true)
    optim.{fqn}.{key}     its optimizer state (AdamW: exp_avg, exp_avg_sq, step)

Each entry is the tensor of the whole model. A rank contributes what it holds: replicated tensors as
they are (DCP writes them once), expert tensors (dim 0 = experts, split over the `ep` ranks) as a
DTensor on the ("ep", "edp") mesh: Shard(0) x Replicate, or Shard(0) x Shard(0) when FSDP2 also splits
them over expert-DP; dense weights sharded by FSDP2 as the DTensors they already are. Loading builds the
same views over this run's own tensors, whatever its layout, and DCP reads into each the part it covers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from engine.checkpoint.dcp.state import load_tensors, tensor_shapes
from engine.checkpoint.errors import CheckpointError
from engine.errors import ResumeError
from engine.parallel.placement import placement


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """id(model weight) -> the tensor the optimizer updates for it (its fp32 master when there is one),
    for the weights this rank's optimizer holds."""
    from engine.training.optim import MasterWeightAdamW

    masters: dict[int, torch.Tensor] = {}
    inner = opt
    while True:
        if isinstance(inner, MasterWeightAdamW):
            masters.update({id(p): m for p, m in inner.pairs})
        if not hasattr(inner, "inner"):
            break
        inner = inner.inner
    held = {id(t) for g in inner.param_groups for t in g["params"]}
    out = {key: m for key, m in masters.items() if id(m) in held}
    master_ids = {id(m) for m in masters.values()}
    for g in inner.param_groups:
        for t in g["params"]:
            if id(t) not in master_ids:
                out[id(t)] = t
    return out


def _view(t: torch.Tensor, expert: bool, mesh) -> torch.Tensor:
    """The global-view object of a local tensor (see the module docstring)."""
    if not (expert and mesh.ep > 1):
        return t
    shape = _global_shape(t, expert, mesh)
    if isinstance(t, DTensor):  # FSDP2's shard over expert-DP of this rank's expert slice
        return DTensor.from_local(
            t.to_local(),
            mesh.device_mesh,
            [Shard(0), Shard(0)],
            run_check=False,
            shape=shape,
            stride=torch.empty(shape, device="meta").stride(),
        )
    return DTensor.from_local(t, mesh.device_mesh, [Shard(0), Replicate()], run_check=False)


def _global_shape(t: torch.Tensor, expert: bool, mesh) -> tuple[int, ...]:
    if not (expert and mesh.ep > 1):
        return tuple(t.shape)
    return (t.shape[0] * mesh.ep, *t.shape[1:])


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor):
        return DTensor.from_local(
            _host_copy(t.to_local()), t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    return t.detach().to("cpu", copy=True)


def _trained(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, is it an expert parameter) of every trained weight."""
    experts = placement(model)
    return [(n, p, experts[n]) for n, p in model.named_parameters() if p.requires_grad]


def collect(model: nn.Module, opt: torch.optim.Optimizer, mesh, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors from this rank. `copy=True` snapshots them in host memory (an async
    save writes them while training goes on)."""
    held = optimizer_tensors(opt)
    out: dict[str, torch.Tensor] = {}
    for fqn, p, expert in _trained(model):
        out[f"model.{fqn}"] = _view(p.detach(), expert, mesh)
        q = held.get(id(p))
        if q is None:  # another rank's optimizer holds this weight's state
            continue
        if q is not p:
            out[f"master.{fqn}"] = _view(q.detach(), expert, mesh)
        for key, v in opt.state.get(q, {}).items():
            if not torch.is_tensor(v):
                v = torch.tensor(v, dtype=torch.float64)
            same = v.shape == q.shape
            out[f"optim.{fqn}.{key}"] = _view(v.detach(), expert and same, mesh)
    if copy:
        out = {k: _host_copy(v) for k, v in out.items()}
    return out


def restore(path, model: nn.Module, opt: torch.optim.Optimizer, mesh) -> None:
    """Load the trained weights, masters and optimizer state of the checkpoint at `path` into this
    rank's model and optimizer, whatever layout wrote it. Every rank calls this together."""
    shapes = tensor_shapes(path)
    trained = _trained(model)
    missing = [f"model.{n}" for n, _, _ in trained if f"model.{n}" not in shapes]
    if missing:
        raise ResumeError(
            f"{path}: lacks trained weights {missing[:3]} (and {max(0, len(missing) - 3)} more): it "
            "was written by another recipe (peft.method, target modules); resume with that run's config, "
            "or start fresh with trainer.resume=none"
        )
    held = optimizer_tensors(opt)
    by_param: dict[str, list[str]] = {}
    for key in shapes:
        if key.startswith("optim."):
            fqn, _, name = key[len("optim.") :].rpartition(".")
            by_param.setdefault(fqn, []).append(name)
    dest: dict[str, torch.Tensor] = {}
    states: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    masters_missing: list[tuple[torch.Tensor, torch.Tensor]] = []
    for fqn, p, expert in trained:
        want = _global_shape(p, expert, mesh)
        if tuple(shapes[f"model.{fqn}"][0]) != want:
            raise CheckpointError(
                path,
                f"model.{fqn} has shape {tuple(shapes[f'model.{fqn}'][0])}, this model "
                f"expects {want}; the checkpoint belongs to another model",
            )
        dest[f"model.{fqn}"] = _view(p.detach(), expert, mesh)
        q = held.get(id(p))
        if q is None:
            continue
        if q is not p:
            if f"master.{fqn}" in shapes:
                dest[f"master.{fqn}"] = _view(q.detach(), expert, mesh)
            else:  # the checkpoint had no masters: start them from the loaded weights
                masters_missing.append((q, p))
        state = {}
        for name in by_param.get(fqn, []):
            size, dtype = shapes[f"optim.{fqn}.{name}"]
            if tuple(size) == want:
                buf = (
                    torch.zeros(q.shape, dtype=dtype, device=q.device)
                    if not isinstance(q, DTensor)
                    else torch.zeros_like(q, dtype=dtype)
                )
                dest[f"optim.{fqn}.{name}"] = _view(buf, expert, mesh)
            else:
                buf = torch.zeros(tuple(size), dtype=dtype)
                dest[f"optim.{fqn}.{name}"] = buf
            state[name] = buf
        states.append((q, state))
    load_tensors(path, dest, process_group=mesh.ckpt_group)
    with torch.no_grad():
        for q, p in masters_missing:
            q.copy_(p)
    groups = {id(t): g for g in opt.param_groups for t in g["params"]}
    for q, state in states:
        if not state:
            continue
        g = groups.get(id(q), {})
        on_device = g.get("fused") or g.get("capturable")
        fixed = {}
        for name, v in state.items():
            if v.dim() == 0 and name == "step":
                v = v.to(device=q.device if on_device else "cpu", dtype=torch.float32)
            fixed[name] = v
        opt.state[q] = fixed
