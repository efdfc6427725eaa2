"""Hub ids without a network, and the `python -m engine.export.convert` CLI."""

import pytest
import torch

from engine.checkpoint import CheckpointNotFoundError, load_hf
from engine.export import convert
from tests.unit.checkpoint.builders import SIDE_FILES, tiny_hf, write_mxfp4_checkpoint, write_side_files


def test_offline_hub_miss_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE is set and the cache has no copy") as err:
        load_hf("no-such-org-4f2a/no-such-gpt-oss")
    assert isinstance(err.value, FileNotFoundError) and "no-such-org-4f2a/no-such-gpt-oss" in str(err.value)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf(tmp_path / "nothing" / "here")


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    path = write_mxfp4_checkpoint(tiny_hf(seed=7, intermediate_size=32), tmp_path_factory.mktemp("cv") / "mxfp4")
    write_side_files(path)
    return path


@pytest.mark.parametrize("flag, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_convert_mxfp4_to_hf_with_verify(mxfp4_dir, tmp_path, capsys, flag, dtype):
    dst = tmp_path / "out"
    code = convert.main([str(mxfp4_dir), str(dst), "--dtype", flag, "--max-shard-size", "20KB", "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"MXFP4 -> {flag}" in out and "the size of the input" in out and "bit for bit" in out
    assert (dst / "model.safetensors.index.json").exists() and (dst / "tokenizer.json").exists()
    direct = load_hf(mxfp4_dir, dtype=dtype).state_dict()
    converted = load_hf(dst, dtype=dtype).state_dict()
    assert all(torch.equal(direct[k], converted[k]) for k in direct)
    assert sorted(p.name for p in dst.iterdir() if not p.name.endswith(".safetensors")) == sorted(
        ["config.json", "model.safetensors.index.json", *SIDE_FILES]
    )


def test_convert_errors_exit_2_with_a_message(mxfp4_dir, tmp_path, capsys):
    assert convert.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert convert.main([str(mxfp4_dir), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert.main([str(mxfp4_dir), str(mxfp4_dir), "--overwrite"]) == 2
    assert "is the source" in capsys.readouterr().err
