"""Generations for a few fixed prompts during training (`trainer.sample_every=N`,
`trainer.sample_prompts=FILE`): greedy, so the same checkpoint always says the same thing and a
change between two samples is the training's doing.

FILE is JSONL (`{"prompt": "..."}` or `{"messages": [...]}` ending with a user message, optional
`reasoning_effort`) or plain text, one prompt per line. Rank 0 logs each answer and appends
`{"step", "prompt", "text"}` to OUTPUT/samples.jsonl (engine.report shows them). Every rank runs
the generation: under expert parallelism each forward is an all-to-all of the whole group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from engine.data.harmony import STOP_TOKENS, prompt_text
from engine.inference.generate import generate, left_pad

log = logging.getLogger(__name__)


def load_sample_prompts(path: str | Path) -> list[dict]:
    """[{"messages": [...], "reasoning_effort": ...}] from FILE; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.sample_prompts={str(path)!r}: no such file")
    prompts = []
    is_jsonl = path.suffix in (".jsonl", ".json")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append({"messages": [{"role": "user", "content": line.strip()}]})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            messages = [{"role": "user", "content": rec["prompt"]}]
        elif (
            isinstance(rec, dict)
            and isinstance(rec.get("messages"), list)
            and rec["messages"]
            and isinstance(rec["messages"][-1], dict)
            and rec["messages"][-1].get("role") == "user"
        ):
            messages = rec["messages"]
        else:
            raise ValueError(
                f'{path}:{n}: expected {{"prompt": str}} or {{"messages": [...]}} ending with a user message'
            )
        prompts.append({"messages": messages, "reasoning_effort": rec.get("reasoning_effort") or "medium"})
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def sample(model, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers (decoded text after `<|start|>assistant`, up to `<|return|>`/`<|call|>`)."""
    ids = [tokenizer.encode(prompt_text(p["messages"], reasoning=p.get("reasoning_effort", "medium"))) for p in prompts]
    input_ids, mask = left_pad(ids, tokenizer.pad_id)
    stops = [tokenizer.special_ids[t] for t in STOP_TOKENS]
    out = generate(
        model, input_ids, max_new_tokens, attention_mask=mask, stop_token_ids=stops, pad_token_id=tokenizer.pad_id
    )
    texts = []
    for row in out[:, input_ids.shape[1] :].tolist():
        for i, t in enumerate(row):
            if t in stops:
                row = row[: i + 1]
                break
        texts.append(tokenizer.decode(row))
    return texts


def build_sampler(cfg, rt, output_dir: Path):
    """A callable(model, step) for the training loop, or None when sampling is off."""
    if not cfg.trainer.sample_every:
        return None
    from engine.data.tokenizer import load_tokenizer
    from engine.training.build import resolve_tokenizer_path

    prompts = load_sample_prompts(cfg.trainer.sample_prompts)
    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg))
    path = output_dir / "samples.jsonl"

    def run(model, step: int) -> None:
        with torch.no_grad(), rt.autocast():
            texts = sample(model, tokenizer, prompts, cfg.trainer.sample_max_new_tokens)
        if not rt.is_main:
            return
        with path.open("a") as f:
            for p, text in zip(prompts, texts):
                prompt = p["messages"][-1]["content"]
                log.info("sample at step %d: %r -> %r", step, prompt, text)
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")

    return run


__all__ = ["load_sample_prompts", "sample", "build_sampler"]
