"""One optimizer step, and the guard that stops a run whose steps keep going non-finite.

1. this rank's micro-batches of the global batch (the global batch is fixed by the recipe, whatever
   the world size; gradient accumulation makes up the difference)
2. the target tokens of the WHOLE global batch (all ranks; under parallel.cp the ranks of a CP group
   read the same rows, so each row is counted once): each micro-batch's summed loss is divided by
   that count, so the accumulated gradient is exactly d(mean token loss) of the global batch,
   independent of how tokens fall on ranks and micro-batches
3. backward per micro-batch; gradients SUMMED across ranks (dense over all ranks, experts over their
   expert-data-parallel group; FSDP2 does it in the backward); global-norm clip
4. the update, unless the loss or the gradient norm is not finite (every rank sees the same global
   values, so every rank skips together)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from engine.data.batch import Batch
from engine.errors import DivergenceError
from engine.parallel import clip_grad_norm, global_token_count, sync_gradients
from engine.parallel.fsdp import clip_sharded, is_sharded


@dataclass
class StepResult:
    loss: float  # the global batch's mean token loss
    grad_norm: float  # the global gradient norm, before clipping
    target_tokens: int  # trained tokens of the global batch
    skipped: bool  # the loss or the gradients were not finite: no update


def train_step(model, batches: list[Batch], optimizer: torch.optim.Optimizer, rt, grad_clip: float) -> StepResult:
    """Forward and backward over `batches` (this rank's micro-batches), gradient sync, clip, and the
    optimizer step unless something is not finite. Every rank calls it together."""
    mesh = rt.mesh
    # Summed over the world, a CP group's shared rows count cp times: divided back (exact).
    n_target = global_token_count(sum(b.num_target_tokens for b in batches), mesh) // mesh.cp
    normalizer = n_target.clamp(min=1).to(torch.float32)
    loss_total = torch.zeros((), device=rt.device)
    for b in batches:
        with rt.forward_context():
            loss = model(**b.model_inputs(rt.device), loss_normalizer=normalizer)
        loss.backward()
        loss_total += loss.detach().float()
    if is_sharded(model):  # FSDP2 reduced the gradients in the backward
        grad_norm = float(clip_sharded(model, mesh, grad_clip))
    else:
        sync_gradients(model, mesh)
        grad_norm = float(clip_grad_norm(model, mesh, grad_clip))
    if mesh.distributed:
        dist.all_reduce(loss_total, op=dist.ReduceOp.SUM, group=mesh.dp_group)
    loss_value = float(loss_total)
    skipped = not (math.isfinite(grad_norm) and math.isfinite(loss_value))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm, int(n_target), skipped)


class NonFiniteGuard:
    """Counts the skipped steps and stops the run after trainer.max_bad_steps of them, naming the last
    checkpoint saved without any to resume from."""

    def __init__(self, max_bad_steps: int, bad_steps: int = 0):
        self.max_bad_steps, self.bad_steps = max_bad_steps, bad_steps

    def check(self, step: int, result: StepResult, last_good: Path | None, log) -> None:
        if not result.skipped:
            return
        self.bad_steps += 1
        log.warning(
            "step %d: non-finite loss/gradient (loss %s, grad_norm %s); update skipped (%d/%d allowed)",
            step,
            result.loss,
            result.grad_norm,
            self.bad_steps,
            self.max_bad_steps,
        )
        if self.bad_steps > self.max_bad_steps:
            where = (
                f"the last checkpoint saved without skipped steps is {last_good}: resume from it "
                f"(trainer.resume={last_good})"
                if last_good
                else "no checkpoint was saved"
            )
            raise DivergenceError(
                f"stopped at step {step}: {self.bad_steps} steps with non-finite loss or "
                f"gradients, more than trainer.max_bad_steps={self.max_bad_steps}; nothing was "
                f"saved after them; {where} with a lower optim.lr, or check the data"
            )
