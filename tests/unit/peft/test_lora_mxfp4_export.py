"""After LoRA on packed MXFP4 experts: the PEFT adapter read the way vLLM documents its gpt-oss 3D MoE LoRA
layout (independent of our loader), the merged export against transformers, generation on the packed base."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint.hf import load_hf
from engine.peft import LoraConfig, apply_lora
from engine.peft.adapters import ExpertLoRA, adapter_modules
from engine.peft.peft_format import export_merged, export_peft
from tests.unit.checkpoint.builders import load_transformers, tiny_hf, write_mxfp4_checkpoint
from tests.unit.peft.helpers import randomize_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A LoRA model over packed MXFP4 experts, with non-zero adapters, and its checkpoint."""
    # vocab 1024: the shipped tokenizer's, which loading for inference falls back to
    hf = tiny_hf(
        seed=5, hidden_size=64, intermediate_size=32, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    base = write_mxfp4_checkpoint(hf, tmp_path_factory.mktemp("mx_export") / "mxfp4")
    model = load_hf(base, dtype=torch.float32, expert_weights="mxfp4").eval()
    apply_lora(model, LoraConfig(rank=R, alpha=ALPHA, target_modules=TARGETS), seed=3)
    randomize_adapters(model)
    return base, model


def test_adapter_reads_as_vllm_gpt_oss_moe_lora(adapted, tmp_path):
    _, model = adapted
    out = export_peft(model, tmp_path / "adapter", base_model_name_or_path="openai/gpt-oss-20b")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA  # one rank and one alpha for the whole adapter
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    scaling = config["lora_alpha"] / config["r"]
    cfg = model.config
    e, h, i, r = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, config["r"]
    checked = 0
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        for layer in range(cfg.num_hidden_layers):
            experts = f"base_model.model.model.layers.{layer}.mlp.experts"
            ours = model.get_submodule(f"model.layers.{layer}.mlp.experts").lora
            assert isinstance(ours, ExpertLoRA)
            # vLLM: experts.base_layer.lora_A/B = gate_up, experts.lora_A/B = down
            for stem, proj, (fan_in, fan_out) in (
                (f"{experts}.base_layer", "gate_up_proj", (h, 2 * i)),
                (experts, "down_proj", (i, h)),
            ):
                lora_a = f.get_tensor(f"{stem}.lora_A.weight")  # [E*r, in] viewed as [E, r, in]
                lora_b = f.get_tensor(f"{stem}.lora_B.weight")  # [out, E*r] viewed as [out, r, E]
                assert lora_a.shape == (e * r, fan_in) and lora_b.shape == (fan_out, e * r)
                a3, b3 = lora_a.view(e, r, fan_in), lora_b.view(fan_out, r, e)
                a, b = ours.factors(proj)  # ours: a [E, in, r], b [E, r, out]
                for x in range(e):
                    served = scaling * b3[:, :, x] @ a3[x]  # [out, in], added to expert x's (out, in) weight
                    expected = ours.scaling * (a[x] @ b[x]).t()
                    torch.testing.assert_close(served, expected, rtol=1e-6, atol=1e-7)
                    checked += 1
    assert checked == cfg.num_hidden_layers * 2 * e


def test_a_lone_gate_up_adapter_is_warned_about(adapted, tmp_path):
    base, _ = adapted
    model = load_hf(base, dtype=torch.float32, expert_weights="mxfp4")
    apply_lora(model, LoraConfig(rank=R, alpha=ALPHA, target_modules=["q_proj", "gate_up_proj"]), seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_peft(model, tmp_path / "adapter", base_model_name_or_path="x")
    said = [str(w.message) for w in caught if "gate_up_proj adapter without a down_proj" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0]


def test_merged_export_of_the_packed_base_matches_transformers(adapted, tmp_path):
    base, model = adapted
    out = export_merged(model, tmp_path / "merged", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # dense weights, as said
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(ids)  # the packed base + unmerged adapters
        theirs = load_transformers(out)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert any(isinstance(a, ExpertLoRA) and not a.merged for _, a, _ in adapter_modules(model))


def test_greedy_generation_on_the_packed_base_equals_the_dequantized_one(adapted):
    from engine.inference.generate import generate
    from engine.peft.lora import lora_state_dict

    base, model = adapted
    dense = load_hf(base, dtype=torch.float32).eval()  # the same checkpoint dequantized at load
    apply_lora(dense, LoraConfig(rank=R, alpha=ALPHA, target_modules=TARGETS), seed=3)
    assert not dense.load_state_dict(lora_state_dict(model), strict=False).unexpected_keys
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    packed_tokens = generate(model, prompt, max_new_tokens=6)
    assert torch.equal(packed_tokens, generate(dense, prompt, max_new_tokens=6))
    assert packed_tokens.shape[-1] >= 6


def test_an_adapter_folder_attached_to_the_packed_base_equals_it_folded_into_the_dense_one(adapted, tmp_path):
    from engine.inference.loading import load_for_inference

    base, model = adapted
    adapter = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    packed = load_for_inference(base, adapter=adapter, dtype=torch.float32, device="cpu", expert_weights="mxfp4")
    folded = load_for_inference(base, adapter=adapter, dtype=torch.float32, device="cpu")
    assert packed.model.model.layers[0].mlp.experts.packed and "12 weights adapted" in packed.source
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(packed.model(ids), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.model(ids), expected, rtol=1e-5, atol=1e-5)
