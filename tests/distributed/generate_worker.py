"""One rank of expert-parallel generation: `python -m tests.distributed.generate_worker OUT_DIR ARGS_JSON`,
started by torchrun. Each rank generates for its own prompts (different lengths and stop tokens per
rank, so the ranks finish at different steps) and saves the tokens to OUT_DIR/rank{RANK}.pt."""

from __future__ import annotations

import json
import os
import sys

import torch

from engine.inference.generate import generate, left_pad
from engine.parallel import Mesh
from engine.parallel.parallelize import apply_expert_parallel
from tests.distributed.cases import expert_parallel_model


def prompts_of(rank: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5 + 3 * rank, 9)]


def main() -> None:
    out_dir, args = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    mesh = Mesh.from_env(ep=args["ep"], num_experts=8, timeout_s=60)
    model = expert_parallel_model("uniform", mesh.ep, mesh.ep_rank)
    apply_expert_parallel(model, mesh)
    ids, mask = left_pad(prompts_of(mesh.rank, model.config.vocab_size), pad_token_id=0)
    stops = args["stops"][mesh.rank]
    out = generate(model, ids, args["new"], attention_mask=mask, stop_token_ids=stops, pad_token_id=0)
    torch.save({"tokens": out}, os.path.join(out_dir, f"rank{mesh.rank}.pt"))
    mesh.destroy()


if __name__ == "__main__":
    main()
