"""LoRA on packed MXFP4 experts (model.expert_weights=mxfp4) against the same LoRA on the dense weights the
checkpoint dequantizes to: losses and adapter gradients over several optimizer steps, every backend; the
packed size on the meta device; the refusals."""

import pytest
import torch

from engine.checkpoint.hf import load_hf
from engine.errors import CheckpointError, ConfigError
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.peft import LoraConfig, apply_lora
from engine.peft.lora import merge_lora
from gptoss_kernels.mxfp4 import Mxfp4Weight
from tests.unit.checkpoint.builders import tiny_hf, write_mxfp4_checkpoint

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
STEPS = 4


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    # hidden 64 and intermediate 32: whole MXFP4 groups of 32 inputs for both projections
    hf = tiny_hf(seed=5, hidden_size=64, intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return write_mxfp4_checkpoint(hf, tmp_path_factory.mktemp("lora_mx") / "mxfp4")


def _batches():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (2, 12), generator=gen) for _ in range(STEPS)]


def _train(model, batches):
    """Losses and adapter gradients of STEPS AdamW steps on the adapters."""
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS), seed=3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, grads = [], []
    for ids in batches:
        loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in params.items()})
        opt.step()
        opt.zero_grad()
    return losses, grads


# triton runs the kernels under the interpreter on CPU (~12 s; the kernels' own MXFP4 tests are not slow)
@pytest.mark.parametrize("backend", ["loop", "grouped_mm", pytest.param("triton", marks=pytest.mark.slow)])
def test_lora_on_mxfp4_experts_equals_lora_on_the_dequantized_weights(mxfp4_dir, backend):
    batches = _batches()
    dense = load_hf(mxfp4_dir, dtype=torch.float32, experts_backend=backend)
    packed = load_hf(mxfp4_dir, dtype=torch.float32, experts_backend=backend, expert_weights="mxfp4")
    experts = packed.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, Mxfp4Weight) and isinstance(experts.down_proj, Mxfp4Weight)
    assert not any(p.dtype == torch.uint8 for p in packed.parameters())
    assert not any("_blocks" in n or "_scales" in n for n in packed.state_dict())  # never in a checkpoint
    l_dense, g_dense = _train(dense, batches)
    l_packed, g_packed = _train(packed, batches)
    assert isinstance(packed.model.layers[0].mlp.experts.gate_up_proj, Mxfp4Weight)  # still packed under LoRA
    assert any("experts.lora.gate_up_A" in n for n in g_packed[0])
    assert g_dense[0].keys() == g_packed[0].keys()
    for step in range(STEPS):
        torch.testing.assert_close(l_packed[step], l_dense[step], rtol=1e-5, atol=1e-5)
        for name, g in g_dense[step].items():
            torch.testing.assert_close(g_packed[step][name], g, rtol=1e-5, atol=1e-5, msg=f"step {step}: {name}")
    assert l_dense[-1] < l_dense[0]  # the adapters did learn


def test_activation_checkpointing_recomputes_the_packed_experts(mxfp4_dir):
    from engine.parallel.parallelize import apply_activation_checkpointing

    batches = _batches()[:2]
    plain = load_hf(mxfp4_dir, dtype=torch.float32, experts_backend="loop", expert_weights="mxfp4")
    checkpointed = load_hf(mxfp4_dir, dtype=torch.float32, experts_backend="loop", expert_weights="mxfp4")
    apply_activation_checkpointing(checkpointed, True)
    (l_plain, g_plain), (l_ckpt, g_ckpt) = _train(plain, batches), _train(checkpointed, batches)
    for step in range(len(batches)):
        torch.testing.assert_close(l_ckpt[step], l_plain[step], rtol=0, atol=0)
        for name, g in g_plain[step].items():
            torch.testing.assert_close(g_ckpt[step][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_meta_model_holds_the_packed_size():
    cfg = GptOssConfig.from_preset("gpt-oss-20b")
    with torch.device("meta"):
        dense = GptOssForCausalLM(cfg, ModelOptions())
        packed = GptOssForCausalLM(cfg, ModelOptions(expert_weights="mxfp4"))

    def nbytes(model, dtype_bytes):
        params = sum(p.numel() * dtype_bytes for p in model.parameters())
        return params + sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype == torch.uint8)

    h, i, e, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers
    expert_weights = layers * e * (h * 2 * i + i * h)
    saved = nbytes(dense, 2) - nbytes(packed, 2)
    # bf16 (16 bits) -> 4 bits + one 8-bit scale per 32 values = 4.25 bits a weight
    assert saved == expert_weights * 2 - expert_weights * 17 // 32
    assert 13.5e9 < nbytes(packed, 2) < 14.0e9  # 12.8 GiB for gpt-oss-20b, about the published files' 13.8 GB


def test_dense_checkpoint_with_mxfp4_is_refused(tmp_path):
    hf = tiny_hf(seed=1, hidden_size=64, intermediate_size=32)
    hf.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="model.expert_weights=mxfp4"):
        load_hf(tmp_path / "dense", dtype=torch.float32, expert_weights="mxfp4")


def test_merging_into_packed_experts_is_refused(mxfp4_dir):
    model = load_hf(mxfp4_dir, dtype=torch.float32, expert_weights="mxfp4")
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS), seed=3)
    with pytest.raises(ValueError, match="model.expert_weights=mxfp4"):
        merge_lora(model)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"path": "x"}}, "peft.method='none' would train"),
        ({"peft": {"method": "lora"}}, "set model.path"),
        ({"model": {"path": "x"}, "peft": {"method": "lora"}, "parallel": {"shard": "full"}}, "parallel.shard='full'"),
    ],
)
def test_config_refusals_name_the_key(overrides, message):
    from engine.config.load import build_config

    values = {"model": {"expert_weights": "mxfp4", **overrides.get("model", {})}}
    values.update({k: v for k, v in overrides.items() if k != "model"})
    with pytest.raises(ConfigError, match=message) as err:
        build_config(values, quiet=True)
    assert "model.expert_weights=mxfp4" in str(err.value) and "\n" not in str(err.value)


def test_an_expert_parallel_rank_reads_only_its_packed_slice(mxfp4_dir):
    from safetensors import safe_open

    rank1 = load_hf(mxfp4_dir, dtype=torch.float32, expert_weights="mxfp4", ep_size=2, ep_rank=1)
    experts = rank1.model.layers[1].mlp.experts
    assert (experts.num_experts, experts.expert_offset) == (2, 2)
    with safe_open(str(mxfp4_dir / "model.safetensors"), "pt") as f:
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
            stored = f.get_tensor(f"model.layers.1.mlp.experts.{name}")
            assert torch.equal(getattr(experts, name), stored[2:4])
