"""HF checkpoints in and out: transformers <-> ours with identical logits, and bit-exact round trips."""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import load_hf, save_hf
from tests.unit.checkpoint.builders import SIDE_FILES, load_transformers, logits, tiny_hf, token_ids


def _tensors(directory):
    """Every tensor of an HF checkpoint directory, whatever its sharding."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_transformers_checkpoint_loads_with_identical_logits(hf_ref, hf_dir):
    ours = load_hf(hf_dir, dtype=torch.float32, experts_backend="loop", attn_backend="eager")
    _assert_same_state(ours.state_dict(), hf_ref.state_dict())
    ids = token_ids()
    assert torch.equal(logits(ours, ids), logits(hf_ref, ids))


def test_transformers_sharded_bf16_checkpoint(tmp_path):
    # save_pretrained's own sharding; bf16 weights with fp32 norms, as transformers keeps them in memory.
    hf = tiny_hf(seed=2).to(torch.bfloat16)
    for name, module in hf.named_modules():
        if name.endswith("norm"):
            module.float()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    stored = _tensors(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert {t.dtype for t in stored.values()} == {torch.bfloat16, torch.float32}
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_hf(tmp_path / "hf", dtype=dtype).state_dict()
        _assert_same_state(ours, {k: v.to(dtype) for k, v in stored.items()})


@pytest.mark.parametrize("max_shard_size", ["5GB", "30KB"], ids=["one_file", "sharded"])
def test_hf_ours_hf_is_bit_exact_and_transformers_reads_it(hf_ref, hf_dir, tmp_path, max_shard_size):
    ours = load_hf(hf_dir, dtype=torch.float32, experts_backend="loop", attn_backend="eager")
    out = save_hf(ours, tmp_path / "export", dtype=torch.float32, max_shard_size=max_shard_size, source_dir=hf_dir)

    _assert_same_state(_tensors(out), _tensors(hf_dir))  # file contents, not just what a loader makes of them
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_size == "5GB":
        assert shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        n = len(shards)
        assert n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(out).values())

    reloaded = load_transformers(out)
    _assert_same_state(reloaded.state_dict(), hf_ref.state_dict())
    ids = token_ids()
    assert torch.equal(logits(reloaded, ids), logits(ours, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_save_load_is_bit_exact(hf_dir, tmp_path, dtype):
    first = load_hf(hf_dir, dtype=dtype)
    save_hf(first, tmp_path / "export", dtype=dtype, max_shard_size="40KB")
    second = load_hf(tmp_path / "export", dtype=dtype)
    _assert_same_state(second.state_dict(), first.state_dict())
    assert all(t.dtype == dtype for t in second.state_dict().values())  # norms too: one training dtype


def test_export_config_and_side_files(hf_dir, tmp_path):
    out = save_hf(load_hf(hf_dir, dtype=torch.float32), tmp_path / "export", source_dir=hf_dir)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["dtype"] == "bfloat16"
    for key in ("num_local_experts", "intermediate_size", "layer_types", "pad_token_id", "eos_token_id"):
        assert config[key] == source[key], key
    assert "quantization_config" not in config
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}


def test_export_refuses_non_empty_dir_and_overwrite_replaces_it(hf_dir, tmp_path):
    model = load_hf(hf_dir, dtype=torch.float32)
    target = tmp_path / "export"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(model, target)
    assert (target / "precious.txt").exists()
    save_hf(model, target, overwrite=True)
    assert not (target / "precious.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary siblings left


def test_interrupted_export_leaves_nothing(hf_dir, tmp_path):
    model = load_hf(hf_dir, dtype=torch.float32)

    def crashing():
        for k, (name, tensor) in enumerate(model.state_dict().items()):
            if k == 10:
                raise KeyboardInterrupt
            yield name, tensor

    with pytest.raises(KeyboardInterrupt):
        save_hf(model, tmp_path / "export", max_shard_size="10KB", state_dict=crashing())
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_incomplete_or_foreign_tensors(hf_dir, tmp_path):
    model = load_hf(hf_dir, dtype=torch.float32)
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    with pytest.raises(ValueError, match="never given.*lm_head.weight"):
        save_hf(model, tmp_path / "a", state_dict=partial)
    with pytest.raises(ValueError, match="not a tensor of this GPT-OSS config"):
        save_hf(model, tmp_path / "b", state_dict={**state, "model.extra.weight": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_expert_parallel_model_saves_through_a_gathering_provider(hf_dir, tmp_path):
    full = load_hf(hf_dir, dtype=torch.float32)
    shard = load_hf(hf_dir, dtype=torch.float32, ep_size=2, ep_rank=1)
    with pytest.raises(ValueError, match="gathers every expert"):
        save_hf(shard, tmp_path / "refused")
    # A stand-in for the all-gather an expert-parallel job plugs in: full expert tensors, any order.
    gathered = ((name, full.state_dict()[name]) for name in reversed(list(shard.state_dict())))
    out = save_hf(shard, tmp_path / "export", dtype=torch.float32, state_dict=gathered)
    _assert_same_state(_tensors(out), {k: v.contiguous() for k, v in full.state_dict().items()})
