"""The CUDA paths CPU tests cannot reach: compiled FlexAttention with its sink gradient, the Triton
and grouped_mm backends in bf16, autocast with fp32 master weights, and the trainer on a GPU.
Run by benchmarks/gpu_suite.sh; skipped (and said so) without a GPU."""

import json
import subprocess
import sys

import pytest
import torch

from tests.hf_reference import hf_config, hf_model, to_ours

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by gpu_suite.sh)")]

# bf16 against an fp32 reference: a few bf16 ulps of logits of size ~1-5.
BF16 = dict(rtol=5e-2, atol=5e-2)


def _ids(cfg, b=2, t=256):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("experts_backend", ["grouped_mm", "triton"])
def test_bf16_backends_match_fp32_transformers(experts_backend):
    hf = hf_model(hf_config(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, sliding_window=32),
                  dead_expert=3).cuda()
    ids = _ids(hf.config)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    ours = to_ours(hf.cpu(), experts_backend=experts_backend, attn_backend="flex").cuda().to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), ref, **BF16)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_compiled_flex_matches_eager_with_gradients(dtype, tol):
    hf = hf_model(hf_config(hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=1,
                            sliding_window=16))
    eager = to_ours(hf, attn_backend="eager", experts_backend="loop").cuda().to(dtype).train()
    flex = to_ours(hf, attn_backend="flex", experts_backend="loop").cuda().to(dtype).train()
    ids = _ids(hf.config, b=2, t=128)
    docs = (torch.arange(128, device="cuda") >= 50).long().expand(2, 128)  # two packed documents
    pos = torch.cat([torch.arange(50), torch.arange(78)]).cuda().expand(2, 128)
    labels = ids.roll(-1, 1)
    for m in (eager, flex):
        m(ids, labels=labels, position_ids=pos, doc_ids=docs).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), flex.named_parameters()):
        torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("recipe", ["tiny_sft", "tiny_lora"])
def test_trainer_on_gpu(tmp_path, recipe):
    pytest.importorskip("hydra", reason="engine/train.py needs hydra-core (gpu_suite.sh installs it from $WHEELS)")
    from engine.train import REPO

    cmd = [sys.executable, str(REPO / "engine" / "train.py"), f"recipe={recipe}", "trainer.device=cuda",
           "model.dtype=bfloat16", "trainer.max_steps=12", "trainer.log_every=1", f"trainer.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    assert records[-1]["peak_memory_gb"] > 0
