"""Offline dry runs of the real recipes (GPU plan, preset architecture, layouts larger than the
processes at hand) and the one-line refusal to resume a finished run."""

import os
import re
import subprocess
import sys
import time

import pytest

from engine.train import REPO

GiB = 2**30


def _train(*overrides, env=None):
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), *overrides]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def _plan_total(stdout: str) -> float:
    return float(re.search(r"total\s+([\d.]+) GiB", stdout).group(1))


def test_real_lora_recipe_dry_runs_offline_with_the_gpu_plan(tmp_path):
    t0 = time.perf_counter()
    proc = _train("recipe=gptoss20b_lora", "trainer.dry_run=true", f"trainer.output_dir={tmp_path}")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "built-in gpt-oss-20b" in out and "not reachable" in out  # says it used the preset
    assert "for 4 GPUs" in out and "plan checks passed" in out
    # bf16 on the GPU: the frozen base's 20.9B parameters, a quarter of the experts per GPU.
    from engine.models.gpt_oss import GptOssConfig

    arch = GptOssConfig.gpt_oss_20b()
    weights = float(re.search(r"weights\s+([\d.]+) GiB", out).group(1))
    h, layers, n_exp, inter = arch.hidden_size, arch.num_hidden_layers, arch.num_local_experts, arch.intermediate_size
    expert_params = layers * n_exp * (h * 2 * inter + inter * h)
    # bf16: a quarter of the experts at 2 bytes plus the dense weights; fp32 experts alone would be 4 bytes.
    assert 2 * (expert_params / 4) / GiB < weights < 4 * (expert_params / 4) / GiB
    assert _plan_total(out) < 80
    assert elapsed < 60, f"dry run took {elapsed:.0f} s"
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_dry_run_plans_32_gpus_from_one_process_and_refuses_what_does_not_fit(tmp_path):
    ok = _train(
        "recipe=gptoss120b_sft", "trainer.dry_run=true", "trainer.dry_run_gpus=32", f"trainer.output_dir={tmp_path}"
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "for 32 GPUs" in ok.stdout and _plan_total(ok.stdout) < 80
    # The same model on 8 GPUs with each one holding an eighth of the experts' state cannot fit.
    bad = _train(
        "recipe=gptoss120b_sft",
        "trainer.dry_run=true",
        "trainer.dry_run_gpus=8",
        "parallel.ep=8",
        "parallel.shard=none",
        f"trainer.output_dir={tmp_path}",
    )
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "exceeds" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_smoke_run_shorter_than_the_warmup_runs_and_a_finished_run_is_refused_at_once(tmp_path):
    common = [
        "recipe=tiny_sft",
        "data.source=synthetic",
        "data.max_seq_len=32",
        "trainer.max_steps=2",
        "trainer.val_every=0",
        f"trainer.output_dir={tmp_path}",
    ]
    first = _train(*common)  # tiny_sft warms up for 5 steps: cut to the run's 2, said in one line
    assert first.returncode == 0, first.stderr[-3000:]
    said = [line for line in (first.stdout + first.stderr).splitlines() if "warmup" in line]
    assert len(said) == 1 and "optim.warmup_steps=5" in said[0] and "trainer.max_steps=2" in said[0], said
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    again = _train(*common)
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, again.stderr
    assert "finished run" in lines[0] and "trainer.output_dir" in lines[0] and "trainer.resume=none" in lines[0]
    # Refused before anything was built, loaded, planned or resumed: the log holds the config's own note alone.
    assert [line for line in again.stdout.splitlines() if line.strip() and "warmup" not in line] == [], again.stdout
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    longer = _train(*common[:-2], "trainer.max_steps=3", common[-1])  # raising max_steps trains on
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed from" in longer.stdout and "step_0000002" in longer.stdout


def _weights_row(stdout: str, row: str) -> float:
    return float(re.search(rf"{row}\s+([\d.]+) GiB", stdout).group(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, gpu_gb, arch_name", [("gptoss120b_lora_1gpu", 80, "120b"), ("gptoss20b_lora_24gb", 24, "20b")]
)
def test_mxfp4_lora_recipes_plan_one_gpu_with_packed_experts(tmp_path, recipe, gpu_gb, arch_name):
    from engine.models.gpt_oss import GptOssConfig

    proc = _train(
        f"recipe={recipe}", "trainer.dry_run=true", f"trainer.gpu_memory_gb={gpu_gb}", f"trainer.output_dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "for 1 GPUs" in out and "all checks passed" in out
    assert _plan_total(out) < 0.95 * gpu_gb
    arch = getattr(GptOssConfig, f"gpt_oss_{arch_name}")()
    h, i = arch.hidden_size, arch.intermediate_size
    matrices = arch.num_hidden_layers * arch.num_local_experts * (h * 2 * i + i * h)
    # 4.25 bits a weight: FP4 codes and one 8-bit scale per 32 values
    assert _weights_row(out, "of which MXFP4 experts") == pytest.approx(matrices * 4.25 / 8 / GiB, abs=0.01)
    if arch_name == "120b":  # the same recipe with the experts dequantized to bf16 cannot fit one GPU
        dense = _train(
            f"recipe={recipe}",
            "model.expert_weights=dense",
            "trainer.dry_run=true",
            f"trainer.gpu_memory_gb={gpu_gb}",
            f"trainer.output_dir={tmp_path}",
        )
        assert dense.returncode == 2, dense.stderr[-3000:]
        assert "exceeds" in dense.stderr and "Traceback" not in dense.stderr
