"""An export a user can load on its own: tokenizer files included, the run's dtype unless --dtype,
clear one-line refusals for the wrong format or an existing output folder."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from engine.train import REPO
from tests.e2e.test_user_errors import TRAINED

# Each test reads tiny runs and runs the export command line.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _python(*args, check=True, cwd=REPO):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(shared_runs):
    """{recipe: output folder} of 2-step tiny runs; the tiny_sft one is tests/e2e/test_user_errors.py's. Read-only."""
    return {recipe: shared_runs.get(1, f"recipe={recipe}", *TRAINED[1:]).out for recipe in ("tiny_sft", "tiny_lora")}


def test_hf_export_of_a_run_loads_with_its_tokenizer_in_the_runs_dtype(runs):
    hf = runs["tiny_sft"] / "hf"
    shipped = REPO / "engine" / "data" / "assets" / "tokenizer" / "tokenizer.json"
    assert (hf / "tokenizer.json").read_bytes() == shipped.read_bytes()  # the tokenizer the run trained with
    config = json.loads((hf / "config.json").read_text())
    assert config["torch_dtype"] == "float32"  # the tiny recipe trains in fp32 on CPU
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    for special in ("<|start|>", "<|message|>", "<|end|>", "<|return|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special


def test_export_cli_dtype_format_and_existing_out(runs, tmp_path):
    step = runs["tiny_sft"] / "checkpoints" / "step_0000002"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        proc = _python("-W", "error::FutureWarning", "-m", "engine.export", str(step), "--out", str(tmp_path / "a"))
    assert "(hf in fp32 (the run's dtype" in proc.stdout
    assert "FutureWarning" not in proc.stderr
    proc = _python("-m", "engine.export", str(step), "--out", str(tmp_path / "b"), "--dtype", "bf16")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "b" / "tokenizer.json").is_file()
    again = _python("-m", "engine.export", str(step), "--out", str(tmp_path / "b"), check=False)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr and "--overwrite" in again.stderr
    lora_step = runs["tiny_lora"] / "checkpoints" / "step_0000002"
    peft = _python("-W", "error::FutureWarning", "-m", "engine.export", str(lora_step), "--out", str(tmp_path / "p"))
    assert "FutureWarning" not in peft.stderr and (tmp_path / "p" / "adapter_config.json").is_file()
    wrong = _python("-m", "engine.export", str(lora_step), "--out", str(tmp_path / "c"), "--format", "hf", check=False)
    assert wrong.returncode == 2 and "--format merged" in wrong.stderr and "Traceback" not in wrong.stderr


def test_readme_recipe_for_loading_a_trained_lora_model(runs):
    # What the README shows: the trained LoRA model back in Python, adapters applied.
    from engine.export import load_trained_model

    cfg, model = load_trained_model(runs["tiny_lora"] / "checkpoints" / "step_0000002", torch.float32)
    assert cfg.peft.method == "lora"
    lora = [n for n, p in model.named_parameters() if "lora" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_a_lora_run_on_a_relative_model_path_exports_and_loads_from_any_directory(runs, tmp_path):
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    shutil.copytree(runs["tiny_sft"] / "hf", launch / "base")
    elsewhere.mkdir()
    _python(
        str(REPO / "engine" / "train.py"),
        "recipe=tiny_lora",
        "model.path=base",
        "trainer.max_steps=1",
        "trainer.val_every=0",
        "trainer.output_dir=lora",
        cwd=launch,
    )
    adapter_config = json.loads((launch / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(launch / "base")  # absolute: valid from anywhere
    step = launch / "lora" / "checkpoints" / "step_0000001"
    _python("-m", "engine.export", str(step), "--out", str(tmp_path / "merged"), "--format", "merged", cwd=elsewhere)
    assert (tmp_path / "merged" / "config.json").is_file()
    _python(
        "-c",
        "import sys; from engine.inference.loading import load_for_inference; "
        "assert load_for_inference(sys.argv[1]).model is not None",
        str(launch / "lora"),
        cwd=elsewhere,
    )
