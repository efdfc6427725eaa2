"""Model pieces against independent references: sliding window, documents, rope, chunked loss, meta build."""

import json
import subprocess
import sys

import pytest
import torch

from engine.models.gpt_oss import ConfigError, GptOssConfig, GptOssForCausalLM
from engine.models.gpt_oss.attention import dense_mask
from engine.models.gpt_oss.loss import linear_cross_entropy
from engine.models.gpt_oss.rope import inv_freq
from engine.moe.experts import shard_model_experts
from engine.train import REPO


def test_sliding_window_sees_exactly_window_keys():
    t, w = 300, 128
    mask = dense_mask(1, t, w, None, "cpu")[0, 0]
    seen = mask.sum(-1)
    assert seen[w - 1] == w and seen[w] == w and seen[-1] == w  # itself + 127 before it
    assert seen[10] == 11  # shorter prefix: everything before it
    i = 200
    assert mask[i, i - 127] and not mask[i, i - 128] and not mask[i, i + 1]


def test_sliding_window_boundary_in_the_model():
    # A key 128 positions back must not change a query on a sliding layer; 127 back must.
    cfg = GptOssConfig.tiny(num_hidden_layers=1, sliding_window=128, layer_types=["sliding_attention"])
    model = GptOssForCausalLM(cfg, attn_backend="eager")
    model.init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    q = 150
    with torch.no_grad():
        base = model(ids)[0, q]
        far, near = ids.clone(), ids.clone()
        far[0, q - 128] = (ids[0, q - 128] + 1) % cfg.vocab_size
        near[0, q - 127] = (ids[0, q - 127] + 1) % cfg.vocab_size
        assert torch.equal(model(far)[0, q], base)
        assert not torch.allclose(model(near)[0, q], base)


@pytest.mark.parametrize("backend", ["eager", "flex", "blockwise", "triton"])
def test_packed_documents_equal_separate_runs(backend):
    cfg = GptOssConfig.tiny(sliding_window=4)
    model = GptOssForCausalLM(cfg, attn_backend=backend)
    model.init_weights(1)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, cfg.vocab_size, (1, 7), generator=g), torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    docs = torch.cat([torch.zeros(7), torch.ones(9)]).long()[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, doc_ids=docs)
        torch.testing.assert_close(out[:, :7], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 7:], model(b), rtol=1e-5, atol=1e-5)


def test_yarn_inv_freq_matches_transformers_at_20b_values():
    from transformers import GptOssConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig()
    ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = inv_freq(GptOssConfig.gpt_oss_20b())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert abs(factor - 1.3465735902799727) < 1e-12


@pytest.mark.parametrize("chunk", [1, 5, 512])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_chunked_cross_entropy_matches_plain(chunk, dtype, tol):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 50, (3, 11), generator=g)
    y[0, :4] = -100
    ours = linear_cross_entropy(h, w, y, chunk_size=chunk)
    (ours * 0.7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.t()).double().reshape(-1, 50), y.reshape(-1), reduction="sum")
    (ref * 0.7).backward()
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gh, h.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(gw, w.grad, rtol=tol, atol=tol)


def test_chunked_cross_entropy_skips_frozen_weight_grad():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(20, 8)
    linear_cross_entropy(h, w, torch.randint(0, 20, (4,))).backward()
    assert h.grad is not None and w.grad is None


def test_20b_and_120b_build_on_meta_without_memory():
    for cfg, total in [(GptOssConfig.gpt_oss_20b(), 20.91e9), (GptOssConfig.gpt_oss_120b(), 116.83e9)]:
        with torch.device("meta"):
            model = GptOssForCausalLM(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - total) / total < 1e-3
        assert n == cfg.param_counts()["total"]
        assert all(p.is_meta for p in model.parameters())


def test_building_on_meta_skips_the_init_and_on_cpu_keeps_torchs_embedding_init():
    # On meta, nn.Embedding's own normal_ init would import torch._dynamo (~0.7 s of every chat, export and
    # dry-run start); on a real device the embedding draws what nn.Embedding draws, from the same generator.
    code = (
        "import sys, torch; from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM\n"
        "with torch.device('meta'): GptOssForCausalLM(GptOssConfig.gpt_oss_20b())\n"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    cfg = GptOssConfig.tiny()
    torch.manual_seed(3)
    ours = GptOssForCausalLM(cfg).model.embed_tokens.weight
    torch.manual_seed(3)
    assert torch.equal(ours, torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size).weight) and ours.requires_grad


def test_expert_parallel_rank_builds_only_its_experts():
    cfg = GptOssConfig.tiny()
    full = GptOssForCausalLM(cfg)
    full.init_weights(3)
    with torch.device("meta"):
        part = GptOssForCausalLM(cfg)
    assert shard_model_experts(part, 4, 2) == cfg.num_hidden_layers  # applied from outside, on meta
    part.to_empty(device="cpu")
    part.init_weights(3)
    e = cfg.num_local_experts // 4
    for name, p in part.named_parameters():
        ref = full.state_dict()[name]
        if ".experts." in name:
            assert p.shape[0] == e
            assert torch.equal(p, ref[2 * e : 3 * e]), name
        else:
            assert torch.equal(p, ref), name


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'gpt_oss'"):
        GptOssConfig.from_hf_dir(tmp_path)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        GptOssConfig.tiny(num_attention_heads=3, num_key_value_heads=2)
    with pytest.raises(ConfigError, match="unknown model preset"):
        GptOssConfig.from_preset("gpt-oss-7b")
    with pytest.raises(ConfigError, match="not found"):
        GptOssConfig.from_hf_dir(tmp_path / "nope")


def test_hf_config_round_trip():
    from transformers import GptOssConfig as HFConfig

    ours = GptOssConfig.from_hf_dict(HFConfig().to_dict())
    assert ours.pad_token_id is None  # null token ids stay null (a tiny vocab has no id 199999)
    assert ours == GptOssConfig.gpt_oss_120b(pad_token_id=None, eos_token_id=None, bos_token_id=None)
    again = HFConfig(**ours.to_hf_dict())
    assert GptOssConfig.from_hf_dict(again.to_dict()) == ours
