"""LoRA over packed MXFP4 experts through engine/train.py: checkpoints hold the adapters and optimizer state
only, the base is read again from model.path on resume (bit-exact), and another base is refused in one line."""

import json
import shutil

import pytest

from engine.checkpoint.dcp import state as ckpt
from tests.train_runs import command, run_command
from tests.unit.checkpoint.builders import tiny_hf, write_mxfp4_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _train(*overrides):
    import os

    return run_command(command(1, *overrides), timeout=500, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _base(seed, directory):
    # vocab 1024: the shipped tokenizer's, which inference falls back to
    hf = tiny_hf(
        seed=seed, hidden_size=64, intermediate_size=32, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return write_mxfp4_checkpoint(hf, directory)


def _export_merged_and_reload(step, out):
    """`--format merged` from a run on the packed base writes dense weights that give the logits of the
    training checkpoint loaded for inference (packed base + adapters)."""
    import os
    import sys

    import torch

    from engine.checkpoint.hf import load_hf
    from engine.inference.loading import load_for_inference

    cmd = [sys.executable, "-m", "engine.export", str(step), "--out", str(out), "--format", "merged"]
    proc = run_command(cmd, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MXFP4 experts are written dense" in proc.stdout, proc.stdout
    packed = load_for_inference(step, dtype=torch.float32, device="cpu").model
    assert packed.model.layers[0].mlp.experts.packed
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), load_hf(out, dtype=torch.float32)(ids), rtol=1e-5, atol=1e-5)


def test_mxfp4_lora_resume_is_bit_exact_and_refuses_another_base(tmp_path):
    base = _base(5, tmp_path / "base")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "recipe=tiny_lora",
        f"model.path={base}",
        "model.expert_weights=mxfp4",
        "data.source=synthetic",
        "data.max_seq_len=32",
        "data.global_batch_size=4",
        "data.micro_batch_size=2",
        "trainer.val_every=0",
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "checkpoint.every=3",
        "checkpoint.keep=5",
    ]
    first = _train(*common, f"trainer.output_dir={straight}")
    assert first.returncode == 0, first.stderr[-3000:]
    step3 = straight / "checkpoints" / "step_0000003"
    saved = ckpt.tensor_shapes(step3)
    assert saved and not any("_blocks" in n or "_scales" in n or n.endswith("experts.gate_up_proj") for n in saved)
    assert all("lora" in n for n in saved if n.startswith("model.")), sorted(saved)[:5]
    assert "base_signature" in ckpt.read_meta(step3)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, resumed / "checkpoints" / "step_0000003")
    again = _train(*common, f"trainer.output_dir={resumed}", "trainer.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b), (a, b)  # bit for bit
    _export_merged_and_reload(straight / "checkpoints" / "step_0000006", tmp_path / "merged")
    # Another base (same shapes, other experts) under the same path: refused before any step, in one line.
    shutil.rmtree(base)
    _base(6, base)
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, other / "checkpoints" / "step_0000003")
    refused = _train(*common, f"trainer.output_dir={other}", "trainer.resume=auto")
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another base than model.path" in lines[0], refused.stderr[-2000:]
    assert not (other / "metrics.jsonl").exists() or "step" not in (other / "metrics.jsonl").read_text()
