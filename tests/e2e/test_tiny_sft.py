"""engine/train.py on the tiny SFT recipe refusing bad input at once (the recipe's full run, the README's, is
checked in test_readme_commands.py)."""

import subprocess
import sys

from engine.train import REPO


def _train(*overrides, check=True):
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_bad_override_fails_fast_with_the_key(tmp_path):
    proc = _train("recipe=tiny_sft", f"trainer.output_dir={tmp_path}", "optim.schedule=linearish", check=False)
    assert proc.returncode != 0
    assert "optim.schedule='linearish'" in proc.stderr


def test_unknown_recipe_is_refused(tmp_path):
    proc = _train("recipe=no_such_recipe", f"trainer.output_dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "no_such_recipe" in proc.stderr and "tiny_sft" in proc.stderr


def test_missing_model_path_fails_fast_naming_it(tmp_path):
    proc = _train(
        "recipe=tiny_sft", f"trainer.output_dir={tmp_path}", f"model.path={tmp_path}/no_such_model", check=False
    )
    assert proc.returncode == 2
    assert "no_such_model" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_file_fails_fast_naming_it(tmp_path):
    proc = _train(
        "recipe=tiny_sft", f"trainer.output_dir={tmp_path}", f"data.train_path={tmp_path}/chats.jsonl", check=False
    )
    assert proc.returncode == 2
    assert "data.train_path" in proc.stderr and "chats.jsonl" in proc.stderr
