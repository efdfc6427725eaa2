"""Render a conversation as harmony training text, split into trained / untrained segments.

The format (docs/gpt-oss.md, "Harmony response format"): each message is
`<|start|>{role}[<|channel|>{channel}]<|message|>{content}<|end|>`, concatenated with no separator;
a generated system message first; then a developer message with the instructions, if any; then
the turns. Choices the spec leaves open, made here:

- A user-given `system` message is treated like a `developer` message: its content becomes the
  developer message's `# Instructions` (as the HF gpt-oss chat template does), because the
  harmony system message is reserved for identity, dates, reasoning level and channels. Several
  system/developer messages are joined with a blank line, in order.
- Earlier assistant turns are rendered without their analysis (harmony drops chain of thought
  from history); only the last assistant message keeps its `thinking`, and only its final answer
  ends with `<|return|>`.
- Loss masks (`loss_mask`): `assistant` trains every assistant message (the earlier ones are
  final answers only), `final_only` trains final-channel content only, `last_turn` trains the
  last assistant message's analysis + final. Headers (`<|start|>assistant<|channel|>final<|message|>`)
  are never trained; the closing `<|end|>` / `<|return|>` of a trained message is.

Segment boundaries always fall next to a special token, so encoding the segments one by one gives
exactly the tokens of encoding the whole text (the tokenizer splits on special tokens first).
"""

from typing import NamedTuple

from engine.data.config import LOSS_MASKS, REASONING_EFFORTS
from engine.data.records import INSTRUCTION_ROLES, Conversation, parse_record

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


class Segment(NamedTuple):
    text: str
    trained: bool


def system_content(reasoning_effort: str = "medium", current_date: str | None = None) -> str:
    """The generated system message: identity, dates, reasoning level, channels."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort = {reasoning_effort!r} is not allowed; choose one of: {', '.join(REASONING_EFFORTS)}"
        )
    header = [MODEL_IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
    if current_date is not None:
        header.append(f"Current date: {current_date}")
    channels = f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message."
    return "\n\n".join(["\n".join(header), f"Reasoning: {reasoning_effort}", channels])


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
    segments: list[Segment] = []

    def add(text: str, trained: bool) -> None:
        if segments and segments[-1].trained == trained:
            segments[-1] = Segment(segments[-1].text + text, trained)
        else:
            segments.append(Segment(text, trained))

    effort = conv.reasoning_effort or reasoning_effort
    add(f"{START}system{MESSAGE}{system_content(effort, current_date)}{END}", False)
    instructions = [m.content for m in conv.messages if m.role in INSTRUCTION_ROLES]
    if instructions:
        add(f"{START}developer{MESSAGE}# Instructions\n\n" + "\n\n".join(instructions) + END, False)

    last = conv.last_assistant_index
    for i, message in enumerate(conv.messages):
        if message.role == "user":
            add(f"{START}user{MESSAGE}{message.content}{END}", False)
        elif message.role == "assistant":
            is_last = i == last
            trained = loss_mask != "last_turn" or is_last
            if is_last and message.thinking is not None:
                add(f"{START}assistant{CHANNEL}analysis{MESSAGE}", False)
                add(message.thinking + END, trained and loss_mask != "final_only")
            add(f"{START}assistant{CHANNEL}final{MESSAGE}", False)
            add(message.content + (RETURN if is_last else END), trained)
    return segments


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
