"""Validation loss during training: the same per-token loss as `python -m engine.evaluate`
(engine.inference.evaluate.token_losses), over one pass of the validation loader, on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.data.batch import IGNORE_INDEX
from engine.inference.evaluate import token_losses


def validation_loss(model, loader, rt) -> float:
    """Mean token loss over one pass of the validation loader, all ranks (summed, divided once). Every
    rank gets the same number of batches, so the expert all-to-all stays in step. Under context
    parallelism each rank scores its chunks of its CP group's shared rows (each token once)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # [loss sum, target tokens]
    for b in loader:
        inputs = b.model_inputs(rt.device)
        labels = inputs.pop("labels")
        with rt.forward_context():
            losses = token_losses(model, inputs["input_ids"], labels, inputs["position_ids"], inputs["doc_ids"])
        if rt.cp is not None:
            labels = labels[:, rt.cp.local_index(labels.shape[1], labels.device)]
        total[0] += losses.double().sum()
        total[1] += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if rt.mesh.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=rt.mesh.dp_group)
    return float(total[0] / total[1].clamp(min=1))
