"""One rank of the context-parallel test: `python -m tests.distributed.cp_worker RANK WORLD STORE OUT WINDOW...`.

Full packed rows go in on every rank; the model keeps this rank's two chunks of each row. The loss
shares and the gradients are summed over the group (as the trainer sums data-parallel gradients),
and rank 0 saves them, with what the sliding layer exchanged ("halo" or "full"), for each sliding
WINDOW in turn in the same process group: OUT holds {window: result}. `run(window)` without a group
is the reference without context parallelism (the test calls it in its own process).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.parallel.context_parallel import ContextParallel

SEQ = 48  # a multiple of 2 x 4: CP 2 and CP 4


def batch(vocab: int):
    """Two packed rows: documents of uneven lengths, positions restarting at each, a few ignored targets."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    lengths = [[13, 20, 15], [5, 30, 13]]
    doc_ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = ids.roll(-1, 1)
    labels[0, :4] = -100
    labels[1, 34] = -100
    return ids, labels, pos, doc_ids


def run(window: int, rank: int = 0, world: int = 1) -> dict:
    """Loss and gradients of the model with sliding window `window`; summed over the group when world > 1."""
    torch.manual_seed(0)
    cfg = GptOssConfig.tiny(num_hidden_layers=2, sliding_window=window)  # one sliding, one full layer
    model = GptOssForCausalLM(cfg, attn_backend="blockwise", experts_backend="loop")
    model.init_weights(0)
    with torch.no_grad():
        model.model.layers[0].self_attn.sinks.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        model.model.layers[1].self_attn.sinks.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    ids, labels, pos, doc_ids = batch(cfg.vocab_size)
    exchange = ""
    if world == 1:
        loss = model(ids, labels=labels, position_ids=pos, doc_ids=doc_ids)
        loss.backward()
    else:
        cp = ContextParallel()
        with cp:
            loss = model(ids, labels=labels, position_ids=pos, doc_ids=doc_ids)
        exchange = cp.last_sliding_exchange
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}, "exchange": exchange}


def main(rank: int, world: int, store: str, out: str, windows: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {window: run(window, rank, world) for window in windows}
    dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], [int(w) for w in sys.argv[5:]])
