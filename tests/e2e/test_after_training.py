"""After a tiny run: samples during training, then chat, evaluate and report on its output folder, as a
user runs them. The evaluation of the final checkpoint must reproduce the trainer's last val_loss."""

import json
import subprocess
import sys

import pytest

from engine.config.load import build_config
from engine.data.config import default_sample_paths
from engine.models.gpt_oss.config import ConfigError
from engine.train import REPO


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def run_dir(shared_runs, sampled_overrides):
    """tiny_sft, 4 steps, validation and samples every 2 (tests/conftest.py: SAMPLED); shared, read-only."""
    return shared_runs.get(1, *sampled_overrides, "parallel.ep=1").out


@pytest.mark.slow
def test_samples_are_logged_during_training(run_dir):
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [
        (2, "What is 2 + 2?"),
        (2, "Name a colour."),
        (4, "What is 2 + 2?"),
        (4, "Name a colour."),
    ]
    assert all(isinstance(s["text"], str) and s["text"] for s in samples)


@pytest.mark.slow
def test_evaluate_reproduces_the_trainers_validation_loss(run_dir, tmp_path):
    val_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    out = tmp_path / "eval.json"
    _run("-m", "engine.evaluate", str(run_dir), "--data", str(default_sample_paths()[1]), "--out", str(out))
    groups = json.loads(out.read_text())["groups"]
    # packed rows with document masks (trainer) vs one record per row (evaluate): same tokens, same loss
    assert groups["mask/assistant"]["loss"] == pytest.approx(val_loss, rel=1e-4)
    assert {"mask/final_only", "channel/analysis", "channel/final", "all"} <= set(groups)


# `python -m engine.chat ...`, saying at exit which of torch's distributed packages it imported.
CHAT_IMPORTS_AT_EXIT = """
import atexit, runpy, sys
heavy = ("torch.distributed.fsdp", "torch.distributed.checkpoint")
atexit.register(lambda: print("imported:", [m for m in heavy if m in sys.modules], file=sys.stderr))
sys.argv = ["engine.chat", *sys.argv[1:]]
runpy.run_module("engine.chat", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_chat_answers_once_on_the_run_and_its_hf_export(run_dir):
    for model in (run_dir, run_dir / "hf"):
        proc = _run("-c", CHAT_IMPORTS_AT_EXIT, str(model), "--prompt", "What is 2 + 2?", "--max-new-tokens", "24")
        assert proc.stdout.strip(), proc.stderr
        # A run's checkpoint is read with torch.distributed.checkpoint; an HF folder needs neither it nor
        # FSDP2 (about 0.6 s of imports each chat start would pay).
        said = "imported: []" if model.name == "hf" else "'torch.distributed.checkpoint']"
        assert said in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_report_on_the_run(run_dir):
    _run("-m", "engine.report", str(run_dir))
    page = (run_dir / "report" / "index.html").read_text()
    assert page.count("<img ") >= 6 and "Samples" in page


def test_sampling_config_is_checked():
    with pytest.raises(ConfigError, match="trainer.sample_prompts"):
        build_config({"trainer": {"sample_every": 5}})
    with pytest.raises(ConfigError, match="trainer.sample_every"):
        build_config({"trainer": {"sample_every": -1}})
