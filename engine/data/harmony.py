"""Render a conversation as harmony training text, split into trained / untrained segments.

The text equals openai-harmony's `render_conversation_for_training` (with `auto_drop_analysis=False`,
on the messages kept by the rule below); the tests compare text and token ids. Each message is
`<|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{content}<|end|>`,
concatenated with no separator: a generated system message first; then a developer message with the
instructions and the function tools (`# Tools`), if any; then the turns. Choices made here:

- A user-given `system` message is treated like a `developer` message: its content becomes the
  developer message's `# Instructions` (as the HF gpt-oss chat template does), because the
  harmony system message is reserved for identity, dates, reasoning level, built-in tools and
  channels. Several system/developer messages are joined with a blank line, in order.
- An assistant chat message becomes up to three kinds of harmony messages, in this order: its
  `thinking` on the analysis channel; then, with `tool_calls`, its non-empty `content` as a
  commentary preamble and one `to=functions.NAME` commentary message per call (`<|constrain|>json`,
  the arguments, `<|call|>`); without tool calls, its `content` on the final channel. A tool result
  is `<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>`.
- Chain of thought: every `thinking` (harmony-native: every analysis message without a recipient)
  after the last user message is kept, including the thinking before tool calls; thinking of
  earlier turns is dropped, as the model never sees it at inference. openai-harmony's own
  `auto_drop_analysis` drops only analysis before the conversation's first final message, which
  keeps stale thinking of middle turns and drops the thinking between tool calls of the last turn.
- The last message ends with `<|return|>` when it is a final answer, `<|call|>` when it is a call.
- Loss masks (`loss_mask`): `assistant` trains every rendered assistant message (analysis,
  preambles, tool calls, final answers), `final_only` trains final-channel messages only, `last_turn`
  trains every assistant message after the last user message. A trained message trains every token
  the model itself writes at inference: everything after `<|start|>assistant` (recipient
  ` to=functions.NAME`, `<|channel|>CHANNEL`, `<|constrain|>json`, `<|message|>`, the content and the
  closing `<|end|>` / `<|return|>` / `<|call|>`), and `<|start|>assistant` too when the message
  follows an assistant message closed by `<|end|>` (the model continues on its own there; after
  user or tool messages, and after `<|call|>`, the caller writes `<|start|>assistant`). System,
  developer, user and tool messages never train.

Segment boundaries always fall next to a special token or at a header piece that openai-harmony
also encodes on its own (` to=...`), so encoding the segments one by one gives exactly its tokens.
"""

from typing import NamedTuple

from engine.data.config import LOSS_MASKS, REASONING_EFFORTS
from engine.data.records import INSTRUCTION_ROLES, Conversation, Message, parse_record
from engine.data.tools import BUILTIN_TOOLS, Namespace, keyed_cache, tools_section

# o200k_harmony ids, for reference: 200006, 200007, 200008, 200005, 200002, 200012, 200003,
# 199998, 199999. Our tokenizers only need each to be a single token.
START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
RETURN = "<|return|>"
CALL = "<|call|>"
CONSTRAIN = "<|constrain|>"
STARTOFTEXT = "<|startoftext|>"
ENDOFTEXT = "<|endoftext|>"
HARMONY_SPECIAL_TOKENS = (STARTOFTEXT, ENDOFTEXT, RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL)

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = ("analysis", "commentary", "final")
FUNCTIONS_LINE = "Calls to these tools must go to the commentary channel: 'functions'."


class Segment(NamedTuple):
    text: str
    trained: bool


def system_content(
    reasoning_effort: str = "medium",
    current_date: str | None = None,
    *,
    builtin_tools: tuple[str, ...] = (),
    function_tools: bool = False,
) -> str:
    """The generated system message: identity, dates, reasoning level, built-in tools, channels."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort = {reasoning_effort!r} is not allowed; choose one of: {', '.join(REASONING_EFFORTS)}"
        )
    header = [MODEL_IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
    if current_date is not None:
        header.append(f"Current date: {current_date}")
    sections = ["\n".join(header), f"Reasoning: {reasoning_effort}"]
    if builtin_tools:
        sections.append(tools_section([BUILTIN_TOOLS[name] for name in builtin_tools]))
    channels = f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message."
    if function_tools:
        channels += "\n" + FUNCTIONS_LINE
    sections.append(channels)
    return "\n\n".join(sections)


def developer_content(conv: Conversation) -> str | None:
    """Instructions and function tools, or None when there are neither (no developer message)."""
    instructions = [m.content for m in conv.messages if m.role in INSTRUCTION_ROLES]
    sections = ["# Instructions", "\n\n".join(instructions)] if instructions else []
    if conv.tools:
        sections.append(_functions_section(conv))
    return "\n\n".join(sections) if sections else None


def _functions_section(conv: Conversation) -> str:
    # The records of a dataset mostly share their tools: render each set of schemas once.
    if not conv.tools_json:
        return tools_section([Namespace("functions", None, conv.tools)])
    return _render_functions(conv.tools_json, conv.tools)


@keyed_cache
def _render_functions(key: str, tools: tuple) -> str:
    return tools_section([Namespace("functions", None, tools)])


class _Writer:
    """Collects segments, merging neighbours with the same loss flag."""

    def __init__(self) -> None:
        self._parts: list[list[str]] = []  # the texts of each segment, joined once at the end
        self._flags: list[bool] = []
        # The last message was an assistant message closed by <|end|>: the model writes the next
        # `<|start|>assistant` itself.
        self.model_continues = False

    def add(self, text: str, trained: bool) -> None:
        if self._flags and self._flags[-1] == trained:
            self._parts[-1].append(text)
        else:
            self._parts.append([text])
            self._flags.append(trained)

    @property
    def segments(self) -> list[Segment]:
        return [Segment("".join(parts), flag) for parts, flag in zip(self._parts, self._flags)]


def render_segments(
    example: dict | Conversation,
    *,
    loss_mask: str = "assistant",
    reasoning_effort: str = "medium",
    current_date: str | None = None,
) -> list[Segment]:
    """The training text of one record as consecutive segments with their loss flag.

    `reasoning_effort` is the default for records without their own. Adjacent segments with the
    same flag are merged, so the list alternates untrained / trained.
    """
    if loss_mask not in LOSS_MASKS:
        raise ValueError(f"loss_mask = {loss_mask!r} is not allowed; choose one of: {', '.join(LOSS_MASKS)}")
    conv = example if isinstance(example, Conversation) else parse_record(example)
    out = _Writer()
    system = system_content(
        conv.reasoning_effort or reasoning_effort,
        current_date,
        builtin_tools=conv.builtin_tools,
        function_tools=bool(conv.tools),
    )
    out.add(f"{START}system{MESSAGE}{system}{END}", False)
    developer = developer_content(conv)
    if developer is not None:
        out.add(f"{START}developer{MESSAGE}{developer}{END}", False)
    last_user = conv.last_user_index
    last = len(conv.messages) - 1
    render_message = _native if conv.native else _chat
    for i, message in enumerate(conv.messages):
        if message.role not in INSTRUCTION_ROLES:
            in_last_turn = i > last_user
            train_any = loss_mask == "assistant" or (loss_mask == "last_turn" and in_last_turn)
            train_final = train_any or loss_mask == "final_only"
            render_message(out, message, in_last_turn, i == last, train_any, train_final)
    return out.segments


def _assistant(out: _Writer, header: str, body: str, end: str, trained: bool, author: str = "assistant") -> None:
    """One assistant message: `header` follows `<|start|>assistant` (recipient first, if any)."""
    out.add(f"{START}{author}", trained and out.model_continues)
    out.add(header, trained)
    out.add(body + end, trained)
    out.model_continues = end == END


def _chat(out: _Writer, m: Message, in_last_turn: bool, is_last: bool, train_any: bool, train_final: bool) -> None:
    if m.role == "user":
        out.add(f"{START}user{MESSAGE}{m.content}{END}", False)
        out.model_continues = False
    elif m.role == "tool":
        out.add(f"{START}functions.{m.name} to=assistant{CHANNEL}commentary{MESSAGE}{m.content}{END}", False)
        out.model_continues = False
    else:
        if m.thinking is not None and in_last_turn:
            _assistant(out, f"{CHANNEL}analysis{MESSAGE}", m.thinking, END, train_any)
        if m.tool_calls:
            if m.content:
                _assistant(out, f"{CHANNEL}commentary{MESSAGE}", m.content, END, train_any)
            for call in m.tool_calls:
                _assistant(
                    out,
                    f" to=functions.{call.name}{CHANNEL}commentary {CONSTRAIN}json{MESSAGE}",
                    call.arguments,
                    CALL,
                    train_any,
                )
        else:
            _assistant(out, f"{CHANNEL}final{MESSAGE}", m.content, RETURN if is_last else END, train_final)


def _native(out: _Writer, m: Message, in_last_turn: bool, is_last: bool, train_any: bool, train_final: bool) -> None:
    assistant = m.role == "assistant"
    if assistant and m.channel == "analysis" and m.recipient is None and not in_last_turn:
        return
    recipient = f" to={m.recipient}" if m.recipient is not None else ""
    header = recipient
    if m.channel is not None:
        header += f"{CHANNEL}{m.channel}"
    if m.content_type is not None:
        header += f" {m.content_type}"
    header += MESSAGE
    author = m.name if m.role == "tool" else (m.role if m.name is None else f"{m.role}:{m.name}")
    if assistant:
        if m.recipient is not None:
            end = CALL
        else:
            end = RETURN if is_last and m.channel == "final" else END
        _assistant(out, header, m.content, end, train_final if m.channel == "final" else train_any, author)
        return
    out.add(f"{START}{author}{header}{m.content}{END}", False)
    out.model_continues = False


def render(
    example: dict | Conversation,
    *,
    loss_mask: str = "assistant",
    reasoning_effort: str = "medium",
    current_date: str | None = None,
) -> str:
    """The exact training text of one record (see render_segments for the options)."""
    segments = render_segments(
        example, loss_mask=loss_mask, reasoning_effort=reasoning_effort, current_date=current_date
    )
    return "".join(segment.text for segment in segments)


STOP_TOKENS = ("<|return|>", "<|call|>")  # where the model's turn ends: its final answer, or a tool call


def prompt_text(messages: list[dict], *, reasoning: str = "medium", tools: list | None = None) -> str:
    """The conversation so far plus `<|start|>assistant`: what the model reads before its turn (chat,
    samples during training). The renderer wants a finished conversation, so it renders one with an
    empty answer, which is cut off again."""
    record = {"messages": [*messages, {"role": "assistant", "content": ""}], "reasoning_effort": reasoning}
    if tools:
        record["tools"] = tools
    text = render(record)
    cut = text.rindex(f"{START}assistant")
    return text[:cut] + f"{START}assistant"
