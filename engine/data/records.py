"""Parse one JSONL record (already JSON-decoded) into a typed, validated Conversation.

Record shapes (the data contract in docs/design.md; each is detected per record):
- OpenAI / HF chat: `{"messages": [...], "tools"?: [...], "reasoning_effort"?, "builtin_tools"?}`.
  Messages have roles system, developer, user, assistant, tool. An assistant message has `content`,
  optional `thinking` (also spelt `reasoning_content` or `reasoning`) and optional `tool_calls`
  (`{"id"?, "type": "function", "function": {"name", "arguments"}}`, arguments a JSON string kept
  verbatim or an object serialised with `json.dumps(obj, ensure_ascii=False)`). A tool message has
  `content` and a `name` or a `tool_call_id` naming an earlier call.
- Harmony-native: the same, with messages that carry `channel` (and `recipient`, `content_type`,
  tool `name` such as `functions.get_weather`), rendered one message per harmony message.
- `{"prompt": str, "completion": str, "reasoning_effort"?}`: one user turn, one answer.

Other top-level keys (ids, sources, metadata) are ignored; unknown keys inside a message are
errors, because a misspelt `thinking` would otherwise silently drop the chain of thought.
`RecordError` messages say where inside the record the problem is; the dataset prefixes them
with `file:line`. Function schemas and built-in tools are parsed in engine/data/tools.py.
"""

import json
from dataclasses import dataclass

from engine.data.config import REASONING_EFFORTS
from engine.data.tools import (
    FunctionTool,
    RecordError,
    check_name,
    check_text,
    parse_builtin_tools,
    parse_tools,
    type_name,
)

ROLES = ("system", "developer", "user", "assistant", "tool")
INSTRUCTION_ROLES = ("system", "developer")
CHANNELS = ("analysis", "commentary", "final")
CONSTRAIN = "<|constrain|>"
THINKING_KEYS = ("thinking", "reasoning_content", "reasoning")
# Thinking keys are accepted (empty) on every role, as chat exports often write `"thinking": null`.
CHAT_KEYS = {
    "system": ("role", "content", *THINKING_KEYS),
    "developer": ("role", "content", *THINKING_KEYS),
    "user": ("role", "content", *THINKING_KEYS),
    "assistant": ("role", "content", "tool_calls", *THINKING_KEYS),
    "tool": ("role", "content", "name", "tool_call_id", *THINKING_KEYS),
}
NATIVE_KEYS = ("role", "content", "channel", "recipient", "content_type", "name")
_KEY_SETS = {keys: frozenset(keys) for keys in (*CHAT_KEYS.values(), NATIVE_KEYS)}
__all__ = ["Conversation", "Message", "RecordError", "ToolCall", "parse_record"]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, rendered verbatim
    id: str | None = None


@dataclass(frozen=True)
class Message:
    """One record message. Chat form fills `thinking`/`tool_calls`/`name` (tool messages: the
    function name); harmony-native form fills `channel`/`recipient`/`content_type`/`name` (the
    author name, e.g. `functions.get_weather`) and is rendered as one harmony message."""

    role: str
    content: str
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    # None: use the configured default.
    reasoning_effort: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    builtin_tools: tuple[str, ...] = ()
    native: bool = False
    # A text identifying the record's `tools` (engine.data.tools.parse_tools): their rendering is
    # remembered under it.
    tools_json: str = ""

    @property
    def last_user_index(self) -> int:
        """Index of the last user message, -1 if none: what comes after it is the last turn."""
        return max((i for i, m in enumerate(self.messages) if m.role == "user"), default=-1)


def parse_record(record: object) -> Conversation:
    """Validate a decoded JSON record; raise RecordError saying what is wrong and where."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type_name(record)}")
    effort = record.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise RecordError(
            f"reasoning_effort = {effort!r} is not allowed; choose one of: {', '.join(REASONING_EFFORTS)}"
        )
    has_messages = "messages" in record
    has_prompt = "prompt" in record or "completion" in record
    if has_messages and has_prompt:
        raise RecordError("a record has either 'messages' or 'prompt'/'completion', not both")
    tools, tools_json = parse_tools(record.get("tools"))
    builtin = parse_builtin_tools(record.get("builtin_tools"))
    native = False
    if has_messages:
        raw = record["messages"]
        if not isinstance(raw, list):
            raise RecordError(f"'messages' must be a list, got {type_name(raw)}")
        if not raw:
            raise RecordError("nothing to train: 'messages' is empty")
        native = any(isinstance(m, dict) and "channel" in m for m in raw)
        parse = _native_message if native else _chat_message
        messages = tuple(parse(i, item) for i, item in enumerate(raw))
    elif has_prompt:
        messages = _parse_prompt_completion(record)
    else:
        raise RecordError(
            f"missing key 'messages' (or 'prompt' and 'completion'); found keys: {sorted(record) or 'none'}"
        )
    _check_structure(messages)
    messages = _check_tool_traffic(messages, {t.name for t in tools}, builtin, native)
    return Conversation(messages, effort, tools, builtin, native, tools_json)


def _parse_prompt_completion(record: dict) -> tuple[Message, ...]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise RecordError(f"missing key '{key}' (a prompt/completion record needs both)")
        check_text(f"'{key}'", record[key])
    return (Message("user", record["prompt"]), Message("assistant", record["completion"]))


def _check_structure(messages: tuple[Message, ...]) -> None:
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
            f"(the trained answer or tool call), not a {messages[-1].role} message"
        )


def _start(index: int, item: object, allowed: dict | tuple) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise RecordError(f"{where} must be an object, got {type_name(item)}")
    if "role" not in item:
        raise RecordError(f"{where}: missing key 'role'")
    role = item["role"]
    if role not in ROLES:
        raise RecordError(f"{where}.role: unknown role {role!r} (allowed: {', '.join(ROLES)})")
    keys = allowed[role] if isinstance(allowed, dict) else allowed
    if item.keys() <= _KEY_SETS[keys]:  # the common case, in C
        return where, role
    for key in item:
        if key not in keys:
            hint = " (only assistant messages make tool calls)" if key == "tool_calls" else ""
            article = "an" if role == "assistant" else "a"
            raise RecordError(
                f"{where}: unknown key {key!r} for {article} {role} message{hint} (allowed: {', '.join(keys)})"
            )
    return where, role


def _chat_message(index: int, item: object) -> Message:
    where, role = _start(index, item, CHAT_KEYS)
    calls = _tool_calls(where, item.get("tool_calls"))
    content = item.get("content")
    if content is None and not calls:
        raise RecordError(f"{where}: missing key 'content' (null only beside 'tool_calls')")
    content = "" if content is None else check_text(f"{where}.content", content)
    thinking = None
    given = [key for key in THINKING_KEYS if item.get(key) is not None]
    if len(given) > 1:
        raise RecordError(f"{where}: give the chain of thought once, not as both {given[0]!r} and {given[1]!r}")
    if given:
        thinking = check_text(f"{where}.{given[0]}", item[given[0]]) or None
    if thinking is not None and role != "assistant":
        raise RecordError(f"{where}.thinking: only assistant messages carry thinking, not {role}")
    if role != "tool":
        return Message(role, content, thinking, calls)
    name, call_id = item.get("name"), item.get("tool_call_id")
    if name is None and call_id is None:
        raise RecordError(f"{where}: a tool message needs 'name' or 'tool_call_id' (which call it answers)")
    if call_id is not None and not isinstance(call_id, str):
        raise RecordError(f"{where}.tool_call_id must be a string, got {type_name(call_id)}")
    if name is not None:
        check_name(f"{where}.name", name)
    return Message(role, content, name=name, tool_call_id=call_id)


def _tool_calls(where: str, raw: object) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RecordError(f"{where}.tool_calls must be a list, got {type_name(raw)}")
    calls = []
    for k, call in enumerate(raw):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise RecordError(f"{at} must be an object, got {type_name(call)}")
        if call.get("type", "function") != "function":
            raise RecordError(f"{at}.type = {call['type']!r}: only 'function' tool calls are supported")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RecordError(f"{at}: missing object 'function' with 'name' and 'arguments'")
        name = function.get("name")
        check_name(f"{at}.function.name", name)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RecordError(f"{at}.id must be a string, got {type_name(call_id)}")
        calls.append(ToolCall(name, _arguments(f"{at}.function.arguments", function.get("arguments")), call_id))
    return tuple(calls)


def _arguments(where: str, arguments: object) -> str:
    if arguments is None:
        raise RecordError(f"{where}: missing (give a JSON object, or its JSON text)")
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise RecordError(
                f"{where} is not valid JSON: {exc.msg} (column {exc.colno}) in {arguments[:60]!r}"
            ) from exc
        return check_text(where, arguments)
    return check_text(where, json.dumps(arguments, ensure_ascii=False))


def _native_message(index: int, item: object) -> Message:
    where, role = _start(index, item, NATIVE_KEYS)
    if "content" not in item:
        raise RecordError(f"{where}: missing key 'content'")
    content = item["content"]
    if isinstance(content, list):  # harmony's own JSON: [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RecordError(f"{where}.content: a list must hold only {{'type': 'text', 'text': ...}} parts")
        content = "".join(p["text"] for p in content)
    content = check_text(f"{where}.content", content)
    fields = {}
    for key in ("channel", "recipient", "content_type", "name"):
        value = item.get(key)
        if value is not None:
            # `<|constrain|>json` is the one header text that holds a special token by design.
            text = value[len(CONSTRAIN) :] if isinstance(value, str) and value.startswith(CONSTRAIN) else value
            check_text(f"{where}.{key}", text)
            fields[key] = value
    channel = fields.get("channel")
    if channel is not None and channel not in CHANNELS:
        raise RecordError(f"{where}.channel: unknown channel {channel!r} (allowed: {', '.join(CHANNELS)})")
    if role == "assistant" and channel is None:
        raise RecordError(f"{where}: an assistant message needs a 'channel' ({', '.join(CHANNELS)})")
    if role == "tool" and "name" not in fields:
        raise RecordError(f"{where}: a tool message needs the tool's 'name', e.g. 'functions.get_weather'")
    for key in ("recipient", "name"):
        if key in fields:
            check_name(f"{where}.{key}", fields[key])
    return Message(role, content, **fields)


def _check_tool_traffic(
    messages: tuple[Message, ...], functions: set[str], builtin: tuple[str, ...], native: bool
) -> tuple[Message, ...]:
    """Every call goes to a declared tool; every result answers an earlier call.

    Returns the messages with each chat-form tool result's `name` filled in from its call.
    """
    called_ids: dict[str, str] = {}
    called_names: set[str] = set()
    out = list(messages)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if native:
            target = message.recipient if message.role == "assistant" else message.name
            if target is not None and message.role in ("assistant", "tool"):
                _check_target(
                    f"{where}.{'recipient' if message.role == 'assistant' else 'name'}", target, functions, builtin
                )
                if message.role == "assistant":
                    called_names.add(target)
                elif target not in called_names:
                    raise RecordError(f"{where}: a result from {target!r} with no earlier call to it")
            continue
        for k, call in enumerate(message.tool_calls):
            if call.name not in functions:
                raise RecordError(
                    f"{where}.tool_calls[{k}]: call to {call.name!r}, which is not in the record's 'tools' "
                    f"(declared: {', '.join(sorted(functions)) or 'none'})"
                )
            if call.id is not None:
                called_ids[call.id] = call.name
            called_names.add(call.name)
        if message.role == "tool":
            if message.tool_call_id is not None:
                name = called_ids.get(message.tool_call_id)
                if name is None:
                    raise RecordError(f"{where}.tool_call_id = {message.tool_call_id!r} names no earlier tool call")
                if message.name is not None and message.name != name:
                    raise RecordError(f"{where}.name = {message.name!r}, but its tool_call_id names a call to {name!r}")
                out[i] = Message("tool", message.content, name=name, tool_call_id=message.tool_call_id)
            elif message.name not in called_names:
                raise RecordError(f"{where}: a result from {message.name!r} with no earlier call to it")
    return tuple(out)


def _check_target(where: str, target: str, functions: set[str], builtin: tuple[str, ...]) -> None:
    namespace, _, tool = target.partition(".")
    if namespace == "functions" and tool in functions:
        return
    if namespace in builtin and (namespace != "browser" or tool in ("search", "open", "find")):
        return
    known = [f"functions.{name}" for name in sorted(functions)] + [
        f"{b}{'.search|open|find' if b == 'browser' else ''}" for b in builtin
    ]
    raise RecordError(f"{where}: unknown recipient {target!r} (declared tools: {', '.join(known) or 'none'})")
