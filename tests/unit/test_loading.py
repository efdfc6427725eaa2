"""engine.inference.loading: a PEFT adapter folded into an HF base equals peft's own model and our LoRA model."""

import pytest
import torch

from engine.checkpoint.hf import save_hf
from engine.inference.loading import load_for_inference
from engine.peft import apply_lora
from engine.peft.config import LoraConfig
from engine.peft.peft_format import export_peft, fold_peft_adapter
from tests.hf_reference import hf_config, hf_model, to_ours


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "mlp.experts.down_proj"]])
def test_folded_peft_adapter_equals_peft_and_our_lora(tmp_path, targets):
    from peft import PeftModel

    cfg = hf_config(vocab_size=1024)
    lora_model = to_ours(hf_model(cfg))
    kw = {} if targets is None else {"target_modules": targets}
    apply_lora(lora_model, LoraConfig(rank=4, alpha=8, **kw), seed=0)
    with torch.no_grad():
        for p in lora_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    export_peft(lora_model, tmp_path / "adapter", base_model_name_or_path="base")
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_lora = lora_model(ids)
        reference = PeftModel.from_pretrained(hf_model(cfg), str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        base = to_ours(hf_model(cfg))
        untouched = base(ids)
        assert fold_peft_adapter(base, tmp_path / "adapter") > 0
        folded = base(ids)
    assert not torch.allclose(untouched, reference, atol=1e-3), "the adapter has no effect; nothing is tested"
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, ours_lora, rtol=1e-5, atol=1e-5)

    save_hf(to_ours(hf_model(cfg)), tmp_path / "hf", dtype=torch.float32)
    loaded = load_for_inference(tmp_path / "hf", adapter=tmp_path / "adapter", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), reference, rtol=1e-5, atol=1e-5)


def test_missing_adapter_files_are_named(tmp_path):
    model = to_ours(hf_model(hf_config()))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fold_peft_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        load_for_inference(tmp_path, device="cpu")
