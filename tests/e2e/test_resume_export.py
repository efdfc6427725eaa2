"""Exact resume, crash-safe checkpoints, and the LoRA export loaded by transformers + peft."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from engine.checkpoint.dcp import state as ckpt
from tests.e2e.test_tiny_sft import _train

# Each test trains through engine/train.py or kills a saving process.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = ["data.max_seq_len=128", "data.global_batch_size=4", "data.micro_batch_size=2", "trainer.val_every=0"]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("tiny_sft", []),
        ("tiny_lora", []),
        ("tiny_sft", ["model.dtype=bfloat16", "optim.master_weights=true"]),  # bf16 weights, fp32 masters
    ],
)
def test_resume_is_bit_exact(tmp_path, recipe, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        f"recipe={recipe}",
        *FAST,
        *extra,
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "checkpoint.every=4",
        "checkpoint.keep=5",
    ]
    _train(*common, f"trainer.output_dir={straight}")
    # A run stopped after step 4: its output folder holds exactly the step-4 checkpoint.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    _train(*common, f"trainer.output_dir={resumed}", "trainer.resume=auto")
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    assert all(a[s] == b[s] for s in b), (a, b)  # bit for bit
    from engine.export import gather_trained_weights

    final_a = gather_trained_weights(straight / "checkpoints" / "step_0000008")
    final_b = gather_trained_weights(resumed / "checkpoints" / "step_0000008")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


SLOW_SAVE = """
import sys, time, torch
from torch.distributed.checkpoint import filesystem
from engine.checkpoint.dcp import state as ckpt
ckpt.save_checkpoint(sys.argv[1], 2, {"w": torch.ones(3)}, {}, {"world_size": 1}, keep=5)
print("first saved", flush=True)
write = filesystem.FileSystemWriter.write_data
def slow_write(self, plan, planner):
    print("writing\\n", end="", flush=True)  # one write: the async save's caller prints beside this thread
    time.sleep(60)  # the kill comes in here, in the middle of writing the tensors
    return write(self, plan, planner)
filesystem.FileSystemWriter.write_data = slow_write
pending = ckpt.save_checkpoint(sys.argv[1], 4, {"w": torch.zeros(3)}, {}, {"world_size": 1}, keep=5,
                               asynchronous=sys.argv[2] == "async")
print("saving\\n", end="", flush=True)
time.sleep(60)  # an async save returns at once: the next training steps would run here
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_save_leaves_a_resumable_run(tmp_path, mode):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(tmp_path), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ckpt.Path(__file__).resolve().parents[2]),
    )
    assert proc.stdout.readline().strip() == "first saved"
    # Killed once the second save is inside the tensor write (no fixed wait); an async save has also
    # returned to the caller by then (in either order: the write runs in the background).
    expected, seen = {"writing", "saving"} if mode == "async" else {"writing"}, set()
    while not expected <= seen:
        line = proc.stdout.readline()
        assert line, f"the saving process ended early (seen {sorted(seen)})"
        seen.add(line.strip())
    assert seen == expected, seen
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_0000002"]
    assert not ckpt.step_dir(tmp_path, 4).exists()
    assert (ckpt.checkpoints_root(tmp_path) / ".tmp_step_0000004").exists()  # the debris the next start removes
    found = ckpt.resolve_resume(tmp_path, "auto")
    assert found.name == "step_0000002"
    w = {"w": torch.empty(3)}
    ckpt.load_tensors(found, w)
    assert torch.equal(w["w"], torch.ones(3))
    assert [p.name for p in ckpt.remove_debris(tmp_path)] == [".tmp_step_0000004"]


def test_lora_export_matches_transformers_peft(tmp_path):
    from peft import PeftModel
    from transformers import GptOssForCausalLM as HFModel

    from engine.export import load_trained_model
    from engine.models.gpt_oss import GptOssConfig
    from tests.hf_reference import hf_model

    base_dir = tmp_path / "base"
    hf_cfg = GptOssConfig.tiny().to_hf_dict()
    from transformers import GptOssConfig as HFConfig

    hf_model(HFConfig(**hf_cfg)).save_pretrained(base_dir)
    out = tmp_path / "run"
    _train(
        "recipe=tiny_lora",
        *FAST,
        "trainer.max_steps=3",
        "optim.warmup_steps=1",
        f"model.path={base_dir}",
        f"trainer.output_dir={out}",
        "optim.lr=0.05",
    )
    assert (out / "adapter" / "adapter_config.json").is_file()
    _, ours = load_trained_model(out / "checkpoints" / "step_0000003", torch.float32)
    ours.eval()
    hf = PeftModel.from_pretrained(HFModel.from_pretrained(base_dir, torch_dtype=torch.float32), out / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids), hf(input_ids=ids).logits
        base_logits = HFModel.from_pretrained(base_dir, torch_dtype=torch.float32)(input_ids=ids).logits
    assert not torch.allclose(ours_logits, base_logits, atol=1e-4)  # the adapters did train
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-5, atol=1e-5)

    # The export CLI writes the same adapter again (from the adapters alone, the base never loaded),
    # and a merged HF checkpoint.
    from safetensors.torch import load_file

    again = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.export", str(out / "checkpoints" / "step_0000003"), "--out", str(again)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = (load_file(d / "adapter_model.safetensors") for d in (out / "adapter", again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.export",
            str(out / "checkpoints" / "step_0000003"),
            "--out",
            str(merged),
            "--format",
            "merged",
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        merged_logits = HFModel.from_pretrained(merged, torch_dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, ours_logits, rtol=1e-5, atol=1e-5)
