"""Every command of the README, in the order written, on a fresh copy of the repository.

A line of a ``` (or ```bash) block that starts a command (python, torchrun, pip, bash, or VAR=value before one)
runs as written, with the test's Python standing for `python` and `torchrun`; a ```python block
runs as a script; ```text blocks (synopses with placeholders) are not run. Only the commands in SKIP are left
out, each with the reason, so a command added to the README is tested from the moment it is written. They run
offline (HF_HUB_OFFLINE=1).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.train import REPO
from tests.train_runs import run_command

SKIP = {
    "python3 -m venv .venv && . .venv/bin/activate": "the set-up: .ci/run makes a fresh environment",
    'pip install -e ".[dev]"': "the set-up: .ci/run runs it in a fresh environment before these tests",
    "python -m pytest tests -q -n 2": "the test command itself, which runs this test",
    "torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN_NAME "
    "engine/train.py recipe=gptoss120b_sft": "needs 4 nodes of 8 GPUs; the dry run above plans that layout",
}
# Needs GPUs and the hub: run offline as its dry run, which is what a user can check without them.
AS_DRY_RUN = {"torchrun --nproc_per_node 4 engine/train.py recipe=gptoss20b_lora"}
STARTS = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(python3?|torchrun|pip|bash)\b")


def readme_steps(text: str) -> list[tuple[str, str]]:
    """('sh', command) and ('py', script) in README order."""
    steps, block, lang = [], None, None
    for line in text.splitlines():
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and block is None:
            block, lang = [], fence.group(1)
        elif fence:
            if lang == "python":
                steps.append(("py", "\n".join(block)))
            elif lang in ("", "bash", "sh", "shell"):  # ```text blocks are synopses, not commands
                joined = "\n".join(block).replace("\\\n", " ")  # shell line continuations
                for cmd in joined.splitlines():
                    cmd = re.sub(r"\s+#.*$", "", cmd).strip()
                    cmd = re.sub(r"\s+", " ", cmd)
                    if STARTS.match(cmd):
                        steps.append(("sh", cmd))
            block = None
        elif block is not None:
            block.append(line)
    return steps


def fresh_copy(dest):
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _argv(cmd: str) -> tuple[dict, list[str]]:
    words = shlex.split(cmd)
    env = {}
    while "=" in words[0] and re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    head = words.pop(0)
    if head in ("python", "python3"):
        return env, [sys.executable, *words]
    if head == "torchrun":
        return env, [sys.executable, "-m", "torch.distributed.run", *words]
    raise AssertionError(f"README command {cmd!r}: no rule to run it here; add it to SKIP with the reason")


def test_readme_steps_are_found():
    steps = readme_steps((REPO / "README.md").read_text())
    commands = [c for kind, c in steps if kind == "sh"]
    assert "python engine/train.py recipe=tiny_sft" in commands
    assert commands.index("python engine/train.py recipe=tiny_sft") < commands.index(
        "python engine/train.py recipe=tiny_lora model.path=outputs/tiny_sft/hf"
    )
    assert any(kind == "py" for kind, _ in steps)
    assert set(SKIP) <= set(commands), sorted(set(SKIP) - set(commands))  # no stale skips


@dataclass
class ReadmeRun:
    """The README's commands run in order on a fresh copy: what succeeded (index, command, seconds, stdout),
    and the first failure (None when every command succeeded). Its outputs/ is read by other end-to-end tests
    (tests/e2e/conftest.py): the tiny runs are trained once per session."""

    repo: Path
    ran: list = field(default_factory=list)
    failure: str | None = None

    def succeeded(self, command: str) -> bool:
        return self.stdout(command) is not None

    def stdout(self, command: str) -> str | None:
        """What a command that succeeded printed; None when it did not run or failed."""
        return next((out for _, step, _, out in self.ran if step == command), None)


def run_readme(dest: Path) -> ReadmeRun:
    """Every README command in order, on a fresh copy of the repository in `dest`; stops at the first failure."""
    run = ReadmeRun(fresh_copy(dest))
    repo = run.repo
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    for i, (kind, step) in enumerate(readme_steps((repo / "README.md").read_text())):
        if kind == "sh" and step in SKIP:
            continue
        if kind == "py":
            env, argv = {}, [sys.executable, "-c", step]
        else:
            env, argv = _argv(step)
            if step in AS_DRY_RUN:
                argv.append("trainer.dry_run=true")
        t0 = time.perf_counter()
        try:
            proc = run_command(argv, timeout=1200, env={**base_env, **env}, cwd=repo)
        except AssertionError as e:  # timed out: the process group is killed, the message says where
            run.failure = f"README step {i} failed:\n{step}\n{e}"
            return run
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            run.failure = (
                f"README step {i} failed after {took:.0f} s (exit {proc.returncode}):\n{step}\n"
                f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
            )
            return run
        run.ran.append((i, step, took, proc.stdout))
    return run


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_commands_run_in_order_on_a_fresh_copy(readme_run):
    for i, step, took, _ in readme_run.ran:
        print(f"README step {i} ({took:.0f} s): {step.splitlines()[0]}")
    assert readme_run.failure is None, readme_run.failure


def _train_commands(text: str) -> set[tuple[str, ...]]:
    """The engine/train.py overrides of every training command in the README, in code blocks and in inline
    code alike (dry runs and --help write no run)."""
    lines = [c for kind, c in readme_steps(text) if kind == "sh"]
    lines += [m.group(1) for m in re.finditer(r"`((?:[A-Z_]+=\S+\s+)*(?:python3?|torchrun)\s[^`]*)`", text)]
    found = set()
    for line in lines:
        words = shlex.split(line)
        if "engine/train.py" in words:
            args = tuple(words[words.index("engine/train.py") + 1 :])
            if "trainer.dry_run=true" not in args and not any(a.startswith("-") for a in args):
                found.add(args)
    return found


def test_each_readme_training_command_writes_its_own_output_dir():
    # A command that shares another's trainer.output_dir resumes (or is refused by) that other run.
    from tests.unit.test_recipes import _compose

    commands = _train_commands((REPO / "README.md").read_text())
    assert ("recipe=tiny_sft", "data.train_path=engine/data/assets/sample_agentic.jsonl") in {
        tuple(a for a in c if not a.startswith("trainer.output_dir=")) for c in commands
    }
    by_dir: dict[str, list] = {}
    for args in commands:
        by_dir.setdefault(_compose(*args)["trainer"]["output_dir"], []).append(" ".join(args))
    shared = {d: c for d, c in by_dir.items() if len(c) > 1}
    assert not shared, f"README commands writing the same trainer.output_dir: {shared}"


def test_readme_data_examples_are_valid_jsonl_as_pasted():
    # A data example is a ```jsonl block (one record per line, as pasted into a .jsonl file), or a ```json
    # block of one pretty-printed record followed by its one-line form.
    import json

    from engine.data.records import parse_record

    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", (REPO / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    assert not [b for lang, b in blocks if lang in ("", "text") and b.lstrip().startswith("{")], (
        "a data example without its jsonl form"
    )
    lines = [line for lang, b in blocks if lang == "jsonl" for line in b.splitlines() if line.strip()]
    assert len(lines) >= 3
    for line in lines:
        parse_record(json.loads(line))
    for lang, block in blocks:
        if lang == "json":
            assert json.dumps(json.loads(block), ensure_ascii=False) in lines


def test_readme_prose_after_each_code_block_and_the_layout_lists_each_folder_once():
    lines = (REPO / "README.md").read_text().splitlines()
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    closing = fences[1::2]
    stray = [lines[i + 1] for i in closing if i + 1 < len(lines) and lines[i + 1].strip()]
    assert not stray, f"text glued to a code block's end: {stray}"
    layout = lines[lines.index("## Layout") :]
    block = layout[layout.index("```") + 1 :]
    block = block[: block.index("```")]
    folders = [line.split()[0] for line in block if re.match(r"^\s*[\w/]+/\s", line)]
    assert len(folders) == len(set(folders)), sorted(f for f in folders if folders.count(f) > 1)


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
