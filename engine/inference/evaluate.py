"""Loss and perplexity of a model on harmony data, split by loss mask and by channel.

    python -m engine.evaluate MODEL --data FILE.jsonl [--adapter DIR] [--max-seq-len N] [--out FILE.json]

MODEL is anything engine.inference.loading accepts (run folder, training checkpoint, HF folder). Every record is
rendered by the data pipeline's harmony renderer and scored once; each target token then counts in
every group it belongs to:
- `mask/assistant`: the tokens the `assistant` loss mask trains (the training default)
- `mask/final_only`: final-channel answers only
- `channel/<name>`: tokens of assistant messages on that channel (`analysis`, `final`,
  `tool_calls` = commentary messages addressed to a tool, `commentary`), found from the tokens
  themselves, so it follows whatever the renderer writes
- `all`: every token after the first of each record
Each group reports loss (mean nats per token), perplexity exp(loss) and its token count.

The trainer's validation (engine.training.validation) uses the same per-token loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.models.gpt_oss.loss import IGNORE_INDEX, token_cross_entropy
from engine.parallel import context_parallel

MASKS = ("assistant", "final_only")
END_TOKENS = ("<|end|>", "<|return|>", "<|call|>")


class Totals:
    """Summed loss and token count per group name."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, losses: torch.Tensor, select: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(losses[select].double().sum())
        self.counts[name] = self.counts.get(name, 0) + int(select.sum())

    def result(self) -> dict[str, dict]:
        out = {}
        for name in sorted(self.sums):
            n = self.counts[name]
            loss = self.sums[name] / n if n else float("nan")
            out[name] = {"loss": loss, "perplexity": math.exp(loss) if n and loss < 700 else float("nan"), "tokens": n}
        return out


def token_losses(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loss [B, T] (0 where labels == IGNORE_INDEX), no gradients: the model's hidden states, then
    the chunked cross-entropy against lm_head. Under context parallelism (`with cp:`): this rank's
    tokens only, [B, T/N] in `cp.local_index` order."""
    from engine.parallel.fsdp import gathered

    with torch.no_grad(), gathered(model):  # under FSDP2 the root's embedding and head are gathered here
        h = model.hidden_states(input_ids, position_ids, doc_ids)
        cp = context_parallel.active()
        if cp is not None:
            labels = labels[:, cp.local_index(labels.shape[1], labels.device)]
        return token_cross_entropy(h, model.lm_head.weight, labels, model.options.ce_chunk_size)


def channel_tags(ids: list[int], tokenizer) -> list[str | None]:
    """The channel of each token an assistant message's author writes, else None: what the loss masks
    train (engine.data.harmony): the header after `<|start|>assistant`, the body and the closing token,
    and `<|start|>assistant` itself after the model's own `<|end|>`. Read from the harmony structure
    `<|start|>{header}<|message|>{body}{<|end|>|<|return|>|<|call|>}`."""
    sp = tokenizer.special_ids
    start, message, end = sp["<|start|>"], sp["<|message|>"], sp["<|end|>"]
    ends = {sp[t] for t in END_TOKENS}
    role = len(tokenizer.encode("assistant"))
    tags: list[str | None] = [None] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] != start:
            i += 1
            continue
        j = i + 1
        while j < len(ids) and ids[j] != message:
            j += 1
        header = tokenizer.decode(ids[i + 1 : j])
        tag = None
        if header.startswith("assistant"):
            channel = header.split("<|channel|>", 1)[1].split()[0] if "<|channel|>" in header else "final"
            tag = "tool_calls" if channel == "commentary" and "to=" in header else channel
        k = j + 1
        while k < len(ids) and ids[k] not in ends:
            k += 1
        continues = i > 0 and ids[i - 1] == end and tags[i - 1] is not None
        for p in range(i if continues else i + 1 + role, min(k + 1, len(ids))):
            tags[p] = tag
        i = k + 1
    return tags


def encode_record(record: dict, tokenizer, max_seq_len: int):
    """(ids [L], {group: bool [L]}) of one record; group flags mark tokens as targets."""
    from engine.data.harmony import render_segments

    ids, groups = None, {}
    for mask in MASKS:
        seg_ids, trained = tokenizer.encode_segments(render_segments(record, loss_mask=mask))
        if ids is not None and list(seg_ids) != ids:
            raise AssertionError("the loss masks rendered different texts")
        ids = list(seg_ids)[:max_seq_len]
        groups[f"mask/{mask}"] = torch.as_tensor(trained[:max_seq_len], dtype=torch.bool)
    tags = channel_tags(ids, tokenizer)
    for name in sorted({t for t in tags if t is not None}):
        groups[f"channel/{name}"] = torch.tensor([t == name for t in tags])
    groups["all"] = torch.ones(len(ids), dtype=torch.bool)
    return ids, groups


def evaluate_records(model, tokenizer, records, *, max_seq_len: int = 4096, batch_size: int = 4) -> dict:
    """Scores of `records` (decoded JSON objects) by group; see the module docstring."""
    device = model.lm_head.weight.device
    totals = Totals()
    encoded = [encode_record(r, tokenizer, max_seq_len) for r in records]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        t = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), t), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), t), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):  # right padding: causal attention never looks ahead
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids) - 1] = torch.tensor(ids[1:])
        losses = token_losses(model, input_ids.to(device), labels.to(device)).cpu()
        for row, (ids, groups) in enumerate(chunk):
            row_losses = losses[row, : len(ids) - 1]  # position p predicts token p + 1
            for name, flags in groups.items():
                totals.add(name, row_losses, flags[1:])
    return totals.result()


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file, each checked by the data pipeline's parser; errors name file:line."""
    from engine.data.records import RecordError, parse_record

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
                parse_record(records[-1])
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON record per line") from None
            except RecordError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def format_table(result: dict) -> str:
    lines = [f"{'group':<22}{'loss':>10}{'ppl':>12}{'tokens':>10}"]
    for name, r in result.items():
        lines.append(f"{name:<22}{r['loss']:>10.4f}{r['perplexity']:>12.3f}{r['tokens']:>10d}")
    return "\n".join(lines)
