"""The harmony chat loop's parts: the prompt of a conversation (rendered by the data pipeline's harmony
renderer, then `<|start|>assistant`), a parser that turns generated ids into channel text and tool calls
as they stream, a printer, and one answered turn. The command line is engine/chat.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.data.harmony import STOP_TOKENS, prompt_text
from engine.inference.generate import generate

DIM, RESET = "\x1b[2m", "\x1b[0m"


def prompt_ids(messages: list[dict], tokenizer, *, reasoning: str = "medium", tools: list | None = None) -> list[int]:
    """Token ids of the conversation so far plus `<|start|>assistant`, the model's turn."""
    text = prompt_text(messages, reasoning=reasoning, tools=tools)
    if tools and not all(_tool_name(t) in text for t in tools):
        raise ValueError(
            "the harmony renderer (engine/data/harmony.py) did not write the tool definitions into "
            "the prompt; this version renders no tools: run without --tools"
        )
    return tokenizer.encode(text)


def _tool_name(tool: dict) -> str:
    return (tool.get("function") or tool).get("name", "")


@dataclass
class Event:
    kind: str  # "text" (channel, delta) | "tool_call" (recipient, arguments) | "end"
    channel: str = ""
    text: str = ""


@dataclass
class HarmonyStream:
    """Turns generated token ids into events, one message at a time. The first header is the rest of
    `<|start|>assistant`, so the stream starts inside a header."""

    tokenizer: object
    header: list[int] = field(default_factory=list)
    body: list[int] = field(default_factory=list)
    in_body: bool = False
    shown: int = 0  # characters of the decoded body already emitted

    def _header_info(self) -> tuple[str, str]:
        text = self.tokenizer.decode(self.header)
        channel = text.split("<|channel|>", 1)[1].split()[0] if "<|channel|>" in text else "final"
        recipient = text.split("to=", 1)[1].split("<|")[0].split()[0] if "to=" in text else ""
        return channel, recipient

    def feed(self, token: int) -> list[Event]:
        sp = self.tokenizer.special_ids
        if not self.in_body:
            if token == sp["<|message|>"]:
                self.in_body = True
            elif token != sp["<|start|>"]:
                self.header.append(token)
            return []
        channel, recipient = self._header_info()
        if token in (sp["<|end|>"], sp["<|return|>"], sp["<|call|>"]):
            events = []
            if recipient:
                events.append(Event("tool_call", recipient, self.tokenizer.decode(self.body)))
            events.append(Event("end", channel))
            self.header, self.body, self.in_body, self.shown = [], [], False, 0
            return events
        self.body.append(token)
        if recipient:
            return []  # arguments are shown whole, once the call is complete
        text = self.tokenizer.decode(self.body)
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet
            return []
        delta, self.shown = text[self.shown :], len(text)
        return [Event("text", channel, delta)] if delta else []

    def flush(self) -> list[Event]:
        """At the end of generation: whatever did not form a complete message (a model that does not
        follow harmony yet), as raw text, so it is seen rather than dropped."""
        if not self.in_body:
            pending = self.header  # a header that never reached <|message|>
        else:
            pending = self.body if self._header_info()[1] else []  # an unfinished tool call; text was shown
        text = self.tokenizer.decode(pending) if pending else ""
        self.header, self.body, self.in_body, self.shown = [], [], False, 0
        return [Event("text", "unparsed", text), Event("end", "unparsed")] if text else []


class Printer:
    def __init__(self, out, color: bool):
        self.out, self.color, self.open = out, color, None

    def __call__(self, event: Event) -> None:
        if event.kind == "text":
            if self.open != event.channel:
                self.open = event.channel
                if not self.color and event.channel != "final":
                    self.out.write(f"[{event.channel}] ")
                elif self.color and event.channel != "final":
                    self.out.write(DIM)
            self.out.write(event.text)
        elif event.kind == "tool_call":
            self.out.write(f"[tool call] {event.channel} {event.text}\n")
        elif event.kind == "end" and self.open is not None:
            self.out.write((RESET if self.color and self.open != "final" else "") + "\n")
            self.open = None
        self.out.flush()


def answer(
    model,
    tokenizer,
    messages: list[dict],
    *,
    reasoning: str,
    tools: list | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    out,
) -> dict:
    """Generate one assistant turn, streaming it to `out`; returns the assistant message for the history."""
    ids = torch.tensor([prompt_ids(messages, tokenizer, reasoning=reasoning, tools=tools)])
    stream = HarmonyStream(tokenizer)
    printer = Printer(out, color=out.isatty())
    final: list[str] = []

    def on_token(token: torch.Tensor) -> None:
        for event in stream.feed(int(token[0])):
            printer(event)
            if event.kind == "text" and event.channel == "final":
                final.append(event.text)

    stops = [tokenizer.special_ids[t] for t in STOP_TOKENS]
    generate(
        model,
        ids,
        max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
        stop_token_ids=stops,
        seed=seed,
        on_token=on_token,
    )
    for event in stream.flush():
        printer(event)
    printer(Event("end"))
    return {"role": "assistant", "content": "".join(final)}


def read_tools(path: str | None) -> list | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--tools {p}: no such file")
    try:
        tools = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--tools {p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and _tool_name(t) for t in tools):
        raise ValueError(
            f"--tools {p}: expected a JSON list of tool definitions, each with a name "
            '(e.g. [{"type": "function", "function": {"name": ..., "parameters": {...}}}])'
        )
    return tools
