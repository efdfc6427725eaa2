"""LoRA on the whole model: identity at init, merge/unmerge, frozen base, state dicts, target errors, report."""

import pytest
import torch

from engine.models.gpt_oss import ConfigError, GptOssConfig, GptOssForCausalLM
from engine.moe.experts import shard_model_experts
from engine.peft import LoraConfig, apply_lora, format_report, lora_state_dict, merge_lora, unmerge_lora
from tests.unit.peft.helpers import randomize_adapters, tiny_pair, token_ids
from tests.unit.peft.lora_state import load_lora_state_dict

BACKENDS = ["loop", "grouped_mm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_zero_b_is_exactly_the_base_model(backend, shared):
    _, model = tiny_pair(experts_backend=backend)
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1, share_expert_adapters=shared))
    model.train()  # dropout active on the adapter inputs: still nothing added while B = 0
    with torch.no_grad():
        assert torch.equal(model(ids), base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_merge_matches_unmerged_and_unmerge_restores(backend, shared):
    _, model = tiny_pair(experts_backend=backend)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = token_ids()
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8, use_rslora=True, share_expert_adapters=shared))
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-2  # the adapters matter
        merge_lora(model)
        merged = model(ids)
        changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
        unmerge_lora(model)
        restored = model(ids)
    # fp32, the same sums in another order (W + s A B folded once vs added per row): a few ulps of the logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert len(changed) == 2 * 6  # q, k, v, o, gate_up, down of both layers were folded into
    torch.testing.assert_close(restored, adapted, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in before:  # W + d - d: back up to one fp32 rounding of each weight
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)
    with pytest.raises(RuntimeError, match="already unmerged"):
        unmerge_lora(model)


def test_only_adapters_get_gradients_and_base_is_bit_identical_after_steps():
    _, model = tiny_pair(experts_backend="grouped_mm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    adapters = set(lora_state_dict(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = token_ids()
    labels = torch.roll(ids, -1, dims=1)
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=labels).backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in adapters), n  # no gradient computed or stored for the base
        opt.step()
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    b = dict(model.named_parameters())["model.layers.1.mlp.experts.lora.down_B"]
    assert b.abs().sum() > 0  # the expert adapters did train (B left zero)


def test_lora_state_dict_round_trip_and_errors():
    _, model = tiny_pair()
    apply_lora(model, LoraConfig(rank=4, share_expert_adapters=True))
    randomize_adapters(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert "model.layers.0.mlp.shared_expert_lora.gate_up_A" in sd
    assert "model.layers.0.self_attn.o_proj.lora_B" in sd
    assert all("lora" in k for k in sd)
    _, other = tiny_pair()
    apply_lora(other, LoraConfig(rank=4, share_expert_adapters=True), seed=5)
    load_lora_state_dict(other, sd)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(other(ids), model(ids))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if "q_proj" not in k})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(other, {k: v[..., :1] if k.endswith("gate_up_A") else v for k, v in sd.items()})
    merge_lora(other)
    with pytest.raises(RuntimeError, match="merged"):
        load_lora_state_dict(other, sd)


def test_report_counts_for_a_partial_target_list():
    _, model = tiny_pair()
    report = apply_lora(model, LoraConfig(rank=2, target_modules=["q_proj", "layers.1.mlp.experts.down_proj"]))
    assert report["adapted"] == {"q_proj": 2, "k_proj": 0, "v_proj": 0, "o_proj": 0, "gate_up_proj": 0, "down_proj": 1}
    assert report["expert_matrices"] == {"gate_up_proj": 0, "down_proj": 4}
    # q: [2, 32] + [32, 2] per layer; layer 1 down: A [4, 24, 2] + B [4, 2, 32]
    assert report["trainable_params"] == 2 * (2 * 32 + 32 * 2) + 4 * (24 * 2 + 2 * 32)
    assert report["param_bytes"] == 4 * report["trainable_params"]
    assert report["optimizer_bytes"] == 8 * report["trainable_params"]  # fp32 adapters: no master copy
    text = format_report(report)
    assert "expert gate_up" in text and "expert down" in text


@pytest.mark.parametrize(
    "targets,match",
    [
        (["q_proj", "router"], "'router' matches no weight"),
        (["layers.7.self_attn.q_proj"], "matches no weight"),
        (["experts"], "matches no weight"),
    ],
)
def test_target_that_matches_nothing_raises(targets, match):
    _, model = tiny_pair()
    with pytest.raises(ConfigError, match=match):
        apply_lora(model, LoraConfig(target_modules=targets))
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rank", 0, "peft.rank=0"),
        ("alpha", -1.0, "peft.alpha"),
        ("dropout", 1.0, "peft.dropout"),
        ("init", "orthogonal", "peft.init='orthogonal'.*kaiming"),
        ("target_modules", [], "peft.target_modules"),
        ("target_modules", "q_proj", "peft.target_modules"),
        ("use_rslora", "yes", "peft.use_rslora"),
    ],
)
def test_config_errors_name_key_and_value(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{field: value}).validate()


def test_grouped_mm_rank_alignment_is_a_config_error():
    _, model = tiny_pair(experts_backend="grouped_mm")
    with pytest.raises(ConfigError, match="multiple of 4"):
        apply_lora(model, LoraConfig(rank=6))
    apply_lora(model, LoraConfig(rank=6, target_modules=["q_proj"]))  # attention alone has no such limit


def test_applying_twice_raises_and_merge_needs_adapters():
    _, model = tiny_pair()
    with pytest.raises(RuntimeError, match="no LoRA adapters"):
        merge_lora(model)
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_lora(model, LoraConfig(rank=2))


@pytest.mark.parametrize("shared", [False, True])
def test_expert_parallel_slice_names_and_init(shared):
    """A rank of a 2-way expert-parallel model holds rows [offset, offset + E_local) of the single-process
    adapters; per-expert adapters are named as expert parameters, a shared one as a dense parameter."""
    cfg = GptOssConfig.tiny(num_hidden_layers=1)
    lora = LoraConfig(rank=4, share_expert_adapters=shared)
    full = GptOssForCausalLM(cfg)
    apply_lora(full, lora, seed=3)
    full_sd = lora_state_dict(full)
    for ep_rank in range(2):
        part = GptOssForCausalLM(cfg)
        shard_model_experts(part, 2, ep_rank)
        apply_lora(part, lora, seed=3)
        e = part.model.layers[0].mlp.experts.num_experts
        for name, t in lora_state_dict(part).items():
            expert_param = ".experts." in name
            assert expert_param == (".mlp." in name and not shared), name
            ref = full_sd[name][ep_rank * e : (ep_rank + 1) * e] if expert_param else full_sd[name]
            assert torch.equal(t, ref), name


@pytest.mark.parametrize("shared,params", [(False, 369_819_648), (True, 26_984_448)])
def test_gpt_oss_20b_rank_32_figures_on_meta(shared, params):
    with torch.device("meta"):
        model = GptOssForCausalLM(GptOssConfig.gpt_oss_20b()).to(torch.bfloat16)
    report = apply_lora(model, LoraConfig(rank=32, alpha=32.0, share_expert_adapters=shared))
    h, q, kv, i, e, layers, r = 2880, 4096, 512, 2880, 32, 24, 32
    attention = layers * r * ((h + q) + 2 * (h + kv) + (q + h))
    experts = layers * r * ((h + 2 * i) + (i + h)) * (1 if shared else e)
    assert report["trainable_params"] == attention + experts == params
    assert report["param_bytes"] == 2 * params  # bf16 adapters
    assert report["optimizer_bytes"] == 12 * params  # fp32 Adam moments + fp32 master copy
