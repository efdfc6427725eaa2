"""Activation offload: the same loss and gradients as plain and checkpointed runs, LoRA included."""

import pytest
import torch

from engine.config.load import build_config
from engine.models.gpt_oss import ConfigError, GptOssConfig, GptOssForCausalLM
from engine.parallel.parallelize import apply_activation_checkpointing
from engine.peft import LoraConfig, apply_lora
from tests.unit.peft.helpers import randomize_adapters


def _model(offload: bool, checkpointing, lora: bool = False):
    cfg = GptOssConfig.tiny(num_hidden_layers=3)
    model = GptOssForCausalLM(cfg, attn_backend="blockwise", experts_backend="loop", activation_offload=offload)
    model.init_weights(3)
    if lora:
        apply_lora(model, LoraConfig(rank=4, alpha=8), seed=0)
        randomize_adapters(model)  # B starts at zero; random B makes the adapters change the output
    if checkpointing:
        apply_activation_checkpointing(model, checkpointing)
    return model.train()


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    loss = model(ids, labels=ids.roll(-1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora,layers", [(False, True), (True, [0, 2])])  # LoRA: the first input needs no grad
def test_offload_equals_plain_and_checkpointed(lora, layers):
    plain_loss, plain = _loss_and_grads(_model(False, False, lora))
    ckpt_loss, ckpt = _loss_and_grads(_model(False, layers, lora))
    off_model = _model(True, layers, lora)
    off_loss, off = _loss_and_grads(off_model)
    torch.testing.assert_close(off_loss, plain_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert set(off) == set(plain) and len(off) > 0
    for name in plain:
        assert off[name] is not None, name
        torch.testing.assert_close(off[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(off[name], ckpt[name], rtol=1e-5, atol=1e-6, msg=name)


def test_offloaded_layers_run_through_the_offload_function():
    model = _model(True, True)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    x = model.model.embed_tokens(ids)
    from engine.models.gpt_oss.attention import AttentionContext
    from engine.models.gpt_oss.offload import OffloadChain
    from engine.models.gpt_oss.rope import cos_sin

    cos, sin = cos_sin(model.config, torch.arange(8)[None])
    ctx = AttentionContext(cos=cos, sin=sin, doc_ids=None, window=model.config.sliding_window, backend="blockwise")
    out = model.model.layers[0](x, ctx, OffloadChain())
    assert type(out.grad_fn).__name__ == "_OffloadedLayerBackward"


def test_offload_without_checkpointing_is_a_config_error():
    with pytest.raises(ConfigError, match="model.activation_offload=true.*activation_checkpointing"):
        build_config({"model": {"activation_offload": True}})
