"""Parse one JSONL record (already JSON-decoded) into a typed, validated Conversation.

Two record shapes are accepted (the data contract in docs/design.md):
- `{"messages": [{"role", "content", "thinking"?}, ...], "reasoning_effort"?: low|medium|high}`
- `{"prompt": str, "completion": str, "reasoning_effort"?: ...}`: one user turn, one answer.

Other top-level keys (ids, sources, metadata) are ignored; unknown keys inside a message are
errors, because a misspelt `thinking` would otherwise silently drop the chain of thought. The
`tool` role and tool calls are not part of the data contract yet and are refused by name.
`RecordError` messages say where inside the record the problem is; the dataset prefixes them
with `file:line`.
"""

from dataclasses import dataclass

from engine.data.config import REASONING_EFFORTS
from engine.errors import DataError

ROLES = ("system", "developer", "user", "assistant")
INSTRUCTION_ROLES = ("system", "developer")
MESSAGE_KEYS = ("role", "content", "thinking")


class RecordError(DataError):
    """A record that does not follow the data format."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # Assistant chain of thought, rendered on the analysis channel; None when absent or empty.
    thinking: str | None = None


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    # None: use the configured default.
    reasoning_effort: str | None = None

    @property
    def last_assistant_index(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m.role == "assistant")


def parse_record(record: object) -> Conversation:
    """Validate a decoded JSON record; raise RecordError saying what is wrong and where."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {_type_name(record)}")
    effort = record.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise RecordError(
            f"reasoning_effort = {effort!r} is not allowed; choose one of: {', '.join(REASONING_EFFORTS)}"
        )
    has_messages = "messages" in record
    has_prompt = "prompt" in record or "completion" in record
    if has_messages and has_prompt:
        raise RecordError("a record has either 'messages' or 'prompt'/'completion', not both")
    if has_messages:
        messages = _parse_messages(record["messages"])
    elif has_prompt:
        messages = _parse_prompt_completion(record)
    else:
        raise RecordError(
            f"missing key 'messages' (or 'prompt' and 'completion'); found keys: {sorted(record) or 'none'}"
        )
    return Conversation(messages=messages, reasoning_effort=effort)


def _parse_prompt_completion(record: dict) -> tuple[Message, ...]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise RecordError(f"missing key '{key}' (a prompt/completion record needs both)")
        if not isinstance(record[key], str):
            raise RecordError(f"'{key}' must be a string, got {_type_name(record[key])}")
    return (Message("user", record["prompt"]), Message("assistant", record["completion"]))


def _parse_messages(raw: object) -> tuple[Message, ...]:
    if not isinstance(raw, list):
        raise RecordError(f"'messages' must be a list, got {_type_name(raw)}")
    if not raw:
        raise RecordError("nothing to train: 'messages' is empty")
    messages = tuple(_parse_message(i, item) for i, item in enumerate(raw))
    # Harmony carries instructions in the system/developer header of the conversation; one
    # in the middle has no faithful rendering, so it is refused rather than moved.
    seen_turn = False
    for i, message in enumerate(messages):
        if message.role in INSTRUCTION_ROLES and seen_turn:
            raise RecordError(
                f"messages[{i}]: a {message.role} message must come before the first user/assistant message"
            )
        seen_turn = seen_turn or message.role not in INSTRUCTION_ROLES
    if not any(m.role == "assistant" for m in messages):
        raise RecordError("nothing to train: the conversation has no assistant message")
    if messages[-1].role != "assistant":
        raise RecordError(
            f"messages[{len(messages) - 1}]: the conversation must end with an assistant message "
            f"(the trained answer), not a {messages[-1].role} message"
        )
    return messages


def _parse_message(index: int, item: object) -> Message:
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise RecordError(f"{where} must be an object, got {_type_name(item)}")
    for key in item:
        if key not in MESSAGE_KEYS:
            raise RecordError(f"{where}: unknown key {key!r} (allowed: {', '.join(MESSAGE_KEYS)})")
    for key in ("role", "content"):
        if key not in item:
            raise RecordError(f"{where}: missing key '{key}'")
    role, content, thinking = item["role"], item["content"], item.get("thinking")
    if role not in ROLES:
        raise RecordError(f"{where}.role: unknown role {role!r} (allowed: {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise RecordError(f"{where}.content must be a string, got {_type_name(content)}")
    if thinking is not None:
        if not isinstance(thinking, str):
            raise RecordError(f"{where}.thinking must be a string, got {_type_name(thinking)}")
        if role != "assistant" and thinking:
            raise RecordError(f"{where}.thinking: only assistant messages carry thinking, not {role}")
    return Message(role=role, content=content, thinking=thinking or None)


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)
