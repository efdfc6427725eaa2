"""model.moe_chunk_tokens: the MoE block in token chunks equals the unchunked block (values and every
gradient at 1e-6 of each tensor's largest magnitude, fp32: the chunks' matmuls have other shapes,
hence a few ulps), in the model with activation checkpointing around it too, and keeps only the chunk
inputs for the backward instead of the routed [tokens x top_k, ...] buffers."""

import pytest
import torch

from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.moe.layer import MoEBlock
from engine.parallel.parallelize import apply_activation_checkpointing


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def _block(chunk: int, backend: str = "loop") -> MoEBlock:
    block = MoEBlock(32, 24, 8, 2, alpha=1.702, limit=7.0, experts_backend=backend, chunk_tokens=chunk)
    gen = torch.Generator().manual_seed(0)
    for p in block.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return block


def _run(block: MoEBlock, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = block(x)
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}, block.last_expert_counts


@pytest.mark.parametrize("chunk,chunks", [(1, 40), (7, 6), (16, 3), (40, 1), (1000, 1)])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_chunked_block_equals_unchunked(chunk, chunks, backend):
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(2, 20, 32, generator=gen), torch.randn(2, 20, 32, generator=gen)
    ref = _run(_block(0, backend), x, g)
    block = _block(chunk, backend)
    got = _run(block, x, g)
    assert block.last_num_chunks == chunks
    _close(got[0], ref[0], "output")
    _close(got[1], ref[1], "input gradient")
    for name, grad in ref[2].items():
        _close(got[2][name], grad, name)
    assert torch.equal(got[3], ref[3])  # expert counts summed over the chunks


def test_model_with_chunks_and_layer_checkpointing_equals_plain_model():
    cfg = GptOssConfig.tiny(num_hidden_layers=2)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=gen)
    results = []
    for chunk, ckpt in ((0, False), (13, True), (13, False)):
        model = GptOssForCausalLM(cfg, attn_backend="blockwise", experts_backend="loop", moe_chunk_tokens=chunk)
        model.init_weights(0)
        apply_activation_checkpointing(model, ckpt)
        loss = model(ids, labels=ids.roll(-1, 1))
        loss.backward()
        assert model.moe_blocks()[0].last_num_chunks == (8 if chunk else 1)  # 96 tokens in chunks of at most 13
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        _close(loss, results[0][0], "loss")
        for name, grad in results[0][1].items():
            _close(grads[name], grad, name)


def test_chunks_keep_only_their_inputs_for_the_backward():
    """Bytes autograd saves in the block's forward: chunked, each chunk's input only (checkpointed);
    unchunked, the routed rows and the expert MLP's intermediates, several times the input."""
    x = torch.randn(1, 512, 32, requires_grad=True)

    def saved_bytes(block: MoEBlock) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return total

    plain, chunked = saved_bytes(_block(0)), saved_bytes(_block(64))
    inputs = x.numel() * 4
    assert plain > 8 * inputs
    assert chunked <= 2 * inputs, (chunked, inputs)
