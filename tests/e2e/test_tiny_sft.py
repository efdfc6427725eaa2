"""The tiny SFT recipe end to end through engine/train.py, as a user runs it."""

import json
import re
import subprocess
import sys

import pytest
import torch

from engine.train import REPO


def _train(*overrides, check=True):
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


CHAT = 'python -m engine.chat outputs/tiny_sft/hf --prompt "What is 2 + 2?"'


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_tiny_sft_learns_and_exports(readme_run, tiny_sft_run):
    # The README's `python engine/train.py recipe=tiny_sft` (tests/e2e/conftest.py): the full recipe,
    # trained once per session on a fresh copy of the repository.
    out = tiny_sft_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in records[0]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert (out / "checkpoints" / "step_0000060" / "meta.json").is_file()

    # The export loads in transformers and gives our logits.
    from transformers import GptOssForCausalLM as HFModel

    from engine.checkpoint.hf import load_hf

    hf = HFModel.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    ours = load_hf(out / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    # The trained model answers in harmony: after the caller's `<|start|>assistant` it writes the
    # message headers itself (the loss masks train them), and engine.chat parses every message.
    # Whether greedy decoding closes with <|return|> within the budget or goes on with another
    # `<|end|><|start|>assistant` message is a near tie after 60 steps (about 0.3 each after the final
    # message, one way or the other with trainer.seed and the rows' composition, next fit as best
    # fit): an answer the budget cuts must still be whole messages, then the start of one.
    from engine.inference.chat import STOP_TOKENS, prompt_ids
    from engine.inference.generate import generate
    from engine.inference.loading import load_for_inference

    loaded = load_for_inference(out / "hf", device="cpu")
    tok = loaded.tokenizer
    message = r"<\|channel\|>(analysis|commentary|final)<\|message\|>[^<]*"
    harmony = re.compile(rf"({message}<\|end\|><\|start\|>assistant)*{message}<\|return\|>")
    cut = re.compile(rf"({message}<\|end\|><\|start\|>assistant)*(<\|channel\|>[a-z]*(<\|message\|>[^<]*)?)?")
    closing_probs = []
    for question in ("What is 2 + 2?", "Name a colour."):
        prompt = torch.tensor([prompt_ids([{"role": "user", "content": question}], tok)])
        answer = generate(loaded.model, prompt, 96, stop_token_ids=[tok.special_ids[t] for t in STOP_TOKENS])
        new = answer[0, prompt.shape[1] :].tolist()
        text = tok.decode(new)
        assert harmony.fullmatch(text) or (len(new) == 96 and cut.fullmatch(text)), (
            f"not a harmony answer to {question!r}: {text!r}"
        )
        closing_probs += _return_probs_after_final(loaded.model, prompt[0].tolist(), new, tok)
    # It has learned how an answer ends: where a final message closes, <|return|> is a likely next
    # token (an untrained model gives it about 1/vocab).
    assert closing_probs and min(closing_probs) > 0.1, closing_probs
    chat = readme_run.stdout(CHAT)  # the README chats with this export; its answer is read here
    if chat is None:  # the README no longer has that command: run it here
        proc = subprocess.run(
            [sys.executable, "-m", "engine.chat", str(out / "hf"), "--prompt", "What is 2 + 2?"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr
        chat = proc.stdout
    assert chat.strip()
    assert "[unparsed]" not in chat, chat


def _return_probs_after_final(model, prompt: list[int], new: list[int], tok) -> list[float]:
    """P(<|return|>) at each place where the answer closes a final-channel message (<|end|> or <|return|>)."""
    closing = {tok.special_ids["<|end|>"], tok.special_ids["<|return|>"]}
    probs = []
    for j, t in enumerate(new):
        header = tok.decode(new[:j]).rsplit("<|channel|>", 1)
        if t in closing and len(header) == 2 and header[1].startswith("final<|message|>"):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + new[:j]]))[0, -1]
            probs.append(float(logits.float().softmax(-1)[tok.special_ids["<|return|>"]]))
    return probs


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
