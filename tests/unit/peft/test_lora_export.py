"""Exports read back by the real consumers: the PEFT adapter by transformers + peft, the merged
checkpoint by transformers alone; both must give our adapted model's logits (fp32, 1e-5: the same
math summed in another order)."""

import json
import warnings

import pytest
import torch

from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.moe.experts import shard_model_experts
from engine.peft import LoraConfig, apply_lora, lora_state_dict
from engine.peft import peft_format as peft_export
from engine.peft.peft_format import export_merged, export_peft
from tests.unit.peft.helpers import randomize_adapters, tiny_pair, token_ids

peft = pytest.importorskip("peft", reason="the PEFT export is checked by loading it with peft")
TOL = dict(rtol=1e-5, atol=1e-5)


def _adapted(cfg: LoraConfig, backend: str = "grouped_mm"):
    hf, ours = tiny_pair(experts_backend=backend)
    apply_lora(ours, cfg)
    randomize_adapters(ours)
    return hf, ours


def _peft_logits(hf, adapter_dir, ids):
    loaded = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        return loaded(input_ids=ids).logits


@pytest.mark.parametrize(
    "cfg",
    [
        LoraConfig(rank=4, alpha=8),
        LoraConfig(rank=4, alpha=6, use_rslora=True, share_expert_adapters=True),
        LoraConfig(rank=4, alpha=8, target_modules=["v_proj", "layers.1.mlp.experts.down_proj"]),
    ],
    ids=["per_expert", "shared_rslora", "partial"],
)
def test_peft_export_loads_in_peft_with_our_logits(cfg, tmp_path):
    hf, ours = _adapted(cfg)
    ids = token_ids()
    with torch.no_grad():
        want, base = ours(ids), hf(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapters change the logits
    export_peft(ours, tmp_path, base_model_name_or_path="tiny-gpt-oss")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "tiny-gpt-oss" and written["r"] == 4
    with warnings.catch_warnings(record=True) as caught:  # peft warns on adapter keys it did not place
        warnings.simplefilter("always")
        got = _peft_logits(hf, tmp_path, ids)
    assert not [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("shared", [False, True])
def test_fused_triton_lora_matches_peft(shared, tmp_path):
    # The Triton backend runs the adapters inside its expert GEMMs (the interpreter, fp32): the logits
    # equal transformers + peft's on the exported adapter.
    pytest.importorskip("triton")
    hf, ours = _adapted(LoraConfig(rank=4, alpha=8, share_expert_adapters=shared), backend="triton")
    ids = token_ids()
    with torch.no_grad():
        want = ours(ids)
    export_peft(ours, tmp_path, base_model_name_or_path="tiny-gpt-oss")
    torch.testing.assert_close(_peft_logits(hf, tmp_path, ids), want, rtol=1e-4, atol=1e-4)


def test_partial_targets_are_written_by_full_name(tmp_path):
    _, ours = _adapted(LoraConfig(rank=4, target_modules=["v_proj", "layers.1.mlp.experts.down_proj"]))
    export_peft(ours, tmp_path, base_model_name_or_path="x")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["v_proj"]
    assert written["target_parameters"] == ["model.layers.1.mlp.experts.down_proj"]
    assert written["lora_dropout"] == 0.0  # peft's expert-parameter LoRA takes no dropout


def test_attention_only_export_warns_and_drops_experts(tmp_path):
    hf, ours = _adapted(LoraConfig(rank=4, alpha=8, dropout=0.1))
    ids = token_ids()
    with pytest.warns(UserWarning, match="expert adapters of 2 layers are DROPPED"):
        export_peft(ours, tmp_path, base_model_name_or_path="x", attention_only=True)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "target_parameters" not in written and written["lora_dropout"] == 0.1
    got = _peft_logits(hf, tmp_path, ids)
    with torch.no_grad():  # what the server will compute: our model without the expert adapters
        for name, p in ours.named_parameters():
            if ".experts.lora." in name:
                p.zero_()
        torch.testing.assert_close(got, ours(ids.clone()), **TOL)


def test_merged_export_loads_in_transformers_alone(tmp_path):
    from transformers import GptOssForCausalLM as HFModel

    hf_base, ours = _adapted(LoraConfig(rank=4, alpha=8))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ids = token_ids()
    with torch.no_grad():
        want = ours(ids)
        assert (want - hf_base(input_ids=ids).logits).abs().max() > 1e-2
    export_merged(ours, tmp_path / "merged", dtype=torch.float32)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())  # the model is left as it was
    hf = HFModel.from_pretrained(tmp_path / "merged", dtype=torch.float32, attn_implementation="eager").eval()
    hf.config._experts_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, want, **TOL)


def test_expert_parallel_slice_refuses_peft_export(tmp_path):
    model = GptOssForCausalLM(GptOssConfig.tiny(num_hidden_layers=1))
    shard_model_experts(model, 2, 1)
    apply_lora(model, LoraConfig(rank=4))
    with pytest.raises(ValueError, match="gather every expert"):
        export_peft(model, tmp_path, base_model_name_or_path="x")
    assert lora_state_dict(model)  # the adapters themselves are untouched


def test_a_peft_with_another_expert_layout_fails_loudly(tmp_path, monkeypatch):
    def expert_major(a, b, num_experts):  # B columns ordered e*r + j: the other plausible layout
        e, fan_in, r = a.shape
        return a.transpose(1, 2).reshape(e * r, fan_in), b.reshape(e * r, -1).t()

    _, ours = _adapted(LoraConfig(rank=4))
    monkeypatch.setattr(peft_export, "_expert_to_peft", expert_major)
    peft_export._check_installed_peft.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="stores GPT-OSS expert LoRA differently"):
            export_peft(ours, tmp_path, base_model_name_or_path="x")
    finally:
        peft_export._check_installed_peft.cache_clear()
    assert not (tmp_path / "adapter_model.safetensors").exists()
