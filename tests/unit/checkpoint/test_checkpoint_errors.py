"""Every bad checkpoint fails before any weight is loaded, with a message naming the file and the tensor."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, CheckpointNotFoundError, load_hf, save_hf
from engine.models.gpt_oss import ConfigError
from tests.unit.checkpoint.builders import tiny_hf, write_mxfp4_checkpoint

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def sharded_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "tiny"
    save_hf(load_hf(hf_dir, dtype=torch.float32), out, dtype=torch.float32, max_shard_size="30KB")
    return out


@pytest.fixture
def copy(tmp_path):
    def make(src):
        return shutil.copytree(src, tmp_path / "ckpt")

    return make


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _index(directory):
    return json.loads((directory / "model.safetensors.index.json").read_text())


def _raises(exc, *parts):
    """pytest.raises whose message must contain every part, in any order."""
    return pytest.raises(exc, match="".join(f"(?=.*{re.escape(str(p))})" for p in parts))


def test_missing_tensor_single_file(hf_dir, copy):
    d = copy(hf_dir)
    _rewrite(d / "model.safetensors", lambda t: t.pop(Q_PROJ))
    with _raises(CheckpointError, d / "model.safetensors", Q_PROJ, "missing"):
        load_hf(d)


def test_missing_tensor_sharded(sharded_dir, copy):
    d = copy(sharded_dir)
    index = _index(d)
    shard = index["weight_map"].pop(Q_PROJ)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _rewrite(d / shard, lambda t: t.pop(Q_PROJ))
    with _raises(CheckpointError, d / "model.safetensors.index.json", Q_PROJ, "missing"):
        load_hf(d)


def test_wrong_shape_says_expected_and_found(hf_dir, copy):
    d = copy(hf_dir)
    _rewrite(d / "model.safetensors", lambda t: t.update({Q_PROJ: torch.zeros(32, 31)}))
    with _raises(CheckpointError, d / "model.safetensors", Q_PROJ, "[32, 31]", "expected [32, 32]"):
        load_hf(d)


def test_wrong_dtype(hf_dir, copy):
    d = copy(hf_dir)
    _rewrite(d / "model.safetensors", lambda t: t.update({Q_PROJ: torch.zeros(32, 32, dtype=torch.int32)}))
    with _raises(CheckpointError, d / "model.safetensors", Q_PROJ, "floating-point"):
        load_hf(d)


def test_missing_shard_file(sharded_dir, copy):
    d = copy(sharded_dir)
    weight_map = _index(d)["weight_map"]
    shard = weight_map[Q_PROJ]
    (d / shard).unlink()
    first = next(name for name, file in weight_map.items() if file == shard)
    with _raises(CheckpointNotFoundError, d / shard, first, "shard is missing"):
        load_hf(d)
    with pytest.raises(FileNotFoundError):
        load_hf(d)


def test_index_names_a_tensor_its_shard_lacks(sharded_dir, copy):
    d = copy(sharded_dir)
    index = _index(d)
    elsewhere = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][Q_PROJ])
    index["weight_map"][Q_PROJ] = elsewhere
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with _raises(CheckpointError, d / elsewhere, Q_PROJ, "does not contain it"):
        load_hf(d)


@pytest.mark.parametrize("damage", ["truncated", "garbled_header"])
def test_damaged_file(sharded_dir, copy, damage):
    d = copy(sharded_dir)
    shard = d / _index(d)["weight_map"][Q_PROJ]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncated" else data[:8] + b"#" * 20 + data[28:])
    with _raises(CheckpointError, shard, "tensor", "truncated or corrupted"):
        load_hf(d)


def test_unsupported_quantization(hf_dir, copy):
    d = copy(hf_dir)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (d / "config.json").write_text(json.dumps(config))
    with _raises(CheckpointError, d / "config.json", "'fp8'", "not supported"):
        load_hf(d)


def test_mxfp4_config_over_unquantized_experts(tmp_path):
    d = tmp_path / "ckpt"
    tiny_hf(intermediate_size=32).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    with _raises(CheckpointError, d / "model.safetensors", "gate_up_proj_blocks", "stored unquantized"):
        load_hf(d)


def test_not_gpt_oss_config(hf_dir, copy):
    d = copy(hf_dir)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with _raises(ConfigError, d / "config.json", "llama"):
        load_hf(d)


def test_no_weights(hf_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    with _raises(CheckpointNotFoundError, d, "model.safetensors"):
        load_hf(d)


def test_unexpected_tensors_are_named_unless_harmless(hf_dir, copy):
    d = copy(hf_dir)
    extra = "model.layers.0.mlp.shared_expert.weight"
    harmless = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(d / "model.safetensors", lambda t: t.update({extra: torch.zeros(4), harmless: torch.zeros(4)}))
    with _raises(CheckpointError, d / "model.safetensors", extra, "not part of a GPT-OSS model"):
        load_hf(d)
    _rewrite(d / "model.safetensors", lambda t: t.pop(extra))
    load_hf(d)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    return write_mxfp4_checkpoint(
        tiny_hf(seed=6, hidden_size=64, intermediate_size=32), tmp_path_factory.mktemp("mx") / "mxfp4"
    )


def test_mxfp4_scales_with_wrong_shape(mxfp4_dir, copy):
    d = copy(mxfp4_dir)
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"  # [E=4, 2I=64, H/32=2]
    _rewrite(d / "model.safetensors", lambda t: t.update({name: t[name][:, :, :1].contiguous()}))
    with _raises(CheckpointError, d / "model.safetensors", name, "[4, 64, 1]", "expected [4, 64, 2]", "MXFP4"):
        load_hf(d)


def test_mxfp4_blocks_in_the_wrong_orientation(mxfp4_dir, copy):
    # Blocks written (in, out) instead of (out, in): caught by shape whenever the matrix is not square.
    d = copy(mxfp4_dir)
    name = "model.layers.0.mlp.experts.down_proj"  # ours [4, I=32, H=64]; stored (out, in) = [4, 64, 1, 16]

    def transpose(t):
        t[f"{name}_blocks"] = torch.zeros(4, 32, 2, 16, dtype=torch.uint8)
        t[f"{name}_scales"] = torch.zeros(4, 32, 2, dtype=torch.uint8)

    _rewrite(d / "model.safetensors", transpose)
    with _raises(CheckpointError, f"{name}_blocks", "[4, 32, 2, 16]", "expected [4, 64, 1, 16]"):
        load_hf(d)
