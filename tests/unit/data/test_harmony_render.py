"""Harmony rendering: exact strings written from the format specification, not from our output."""

import pytest

from engine.data.harmony import render, render_segments

SYSTEM_HIGH = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "\n"
    "Reasoning: high\n"
    "\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


def system(level: str) -> str:
    return SYSTEM_HIGH.replace("Reasoning: high", f"Reasoning: {level}")


# docs/gpt-oss.md, "Rendered training example", copied character for character.
SPEC_EXAMPLE = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions

Answer the user's questions like a robot.<|end|><|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"""

SPEC_RECORD = {
    "reasoning_effort": "high",
    "messages": [
        {"role": "developer", "content": "Answer the user's questions like a robot."},
        {"role": "user", "content": "What is 2 + 2?"},
        {
            "role": "assistant",
            "content": "2 + 2 = 4.",
            "thinking": 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.',
        },
    ],
}

MULTI_TURN = [
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 7.", "thinking": "Add 3 and 4."},
    {"role": "user", "content": "And times 2?"},
    {"role": "assistant", "content": "7 * 2 = 14.", "thinking": "Double 7."},
]


def test_spec_example_renders_byte_for_byte():
    assert render(SPEC_RECORD) == SPEC_EXAMPLE


def test_user_system_message_becomes_developer_instructions():
    record = {
        **SPEC_RECORD,
        "messages": [
            {"role": "system", "content": "Answer the user's questions like a robot."},
            *SPEC_RECORD["messages"][1:],
        ],
    }
    assert render(record) == SPEC_EXAMPLE


def test_system_and_developer_instructions_are_joined_in_order():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Salut."},
        ]
    }
    expected = (
        system("medium")
        + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\nUse French.<|end|>"
        + "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Salut.<|return|>"
    )
    assert render(record) == expected


@pytest.mark.parametrize("level", ["low", "medium", "high"])
@pytest.mark.parametrize("developer", [False, True])
def test_multi_turn_each_level_drops_earlier_analysis(level, developer):
    messages = ([{"role": "developer", "content": "Be terse."}] if developer else []) + MULTI_TURN
    expected = system(level)
    if developer:
        expected += "<|start|>developer<|message|># Instructions\n\nBe terse.<|end|>"
    expected += (
        "<|start|>user<|message|>What is 3 + 4?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>3 + 4 = 7.<|end|>"
        "<|start|>user<|message|>And times 2?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Double 7.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>7 * 2 = 14.<|return|>"
    )
    assert render({"messages": messages, "reasoning_effort": level}) == expected


def test_default_reasoning_is_medium_and_record_level_wins():
    record = {"messages": MULTI_TURN[:2]}
    assert "Reasoning: medium\n" in render(record)
    assert "Reasoning: low\n" in render(record, reasoning_effort="low")
    assert "Reasoning: high\n" in render({**record, "reasoning_effort": "high"}, reasoning_effort="low")


def test_current_date_line_only_when_given():
    expected = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n"
        "Current date: 2025-06-28\n"
        "\n"
        "Reasoning: medium\n"
        "\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello.<|return|>"
    )
    record = {"prompt": "Hi", "completion": "Hello."}
    assert render(record, current_date="2025-06-28") == expected
    assert "Current date" not in render(record)


def test_prompt_completion_is_a_user_turn_and_a_final_answer():
    expected = system("low") + (
        "<|start|>user<|message|>Capital of Peru?<|end|><|start|>assistant<|channel|>final<|message|>Lima.<|return|>"
    )
    assert render({"prompt": "Capital of Peru?", "completion": "Lima.", "reasoning_effort": "low"}) == expected


def trained_text(record: dict, loss_mask: str) -> list[str]:
    return [s.text for s in render_segments(record, loss_mask=loss_mask) if s.trained]


MASK_RECORD = {"messages": [{"role": "developer", "content": "Be terse."}, *MULTI_TURN]}


FIRST_ANSWER = "<|channel|>final<|message|>3 + 4 = 7.<|end|>"
LAST_ANSWER = "<|start|>assistant<|channel|>final<|message|>7 * 2 = 14.<|return|>"


def test_mask_assistant_trains_every_assistant_message():
    # Each trained message trains what the model writes after the caller's `<|start|>assistant`;
    # after its own `<|end|>` the model writes `<|start|>assistant` too.
    assert trained_text(MASK_RECORD, "assistant") == [
        FIRST_ANSWER,
        "<|channel|>analysis<|message|>Double 7.<|end|>" + LAST_ANSWER,
    ]


def test_mask_final_only_skips_analysis():
    assert trained_text(MASK_RECORD, "final_only") == [FIRST_ANSWER, LAST_ANSWER]


def test_mask_last_turn_trains_only_the_last_answer():
    assert trained_text(MASK_RECORD, "last_turn") == ["<|channel|>analysis<|message|>Double 7.<|end|>" + LAST_ANSWER]


@pytest.mark.parametrize("loss_mask", ["assistant", "final_only", "last_turn"])
def test_segments_concatenate_to_render_and_train_no_caller_header(loss_mask):
    segments = render_segments(MASK_RECORD, loss_mask=loss_mask)
    assert "".join(s.text for s in segments) == render(MASK_RECORD)
    for before, segment in zip([None, *segments], segments):
        if segment.trained:  # never a system/developer/user message, nor the caller's <|start|>assistant
            assert not segment.text.startswith("<|start|>") or before.text.endswith("<|end|>")
            assert "<|start|>user" not in segment.text and "<|start|>system" not in segment.text
        else:
            assert segment.text.endswith("<|start|>assistant") or segment.text.endswith("<|end|>")
    assert all(a.trained != b.trained for a, b in zip(segments, segments[1:])), "adjacent segments are merged"


def test_unknown_loss_mask_is_rejected():
    with pytest.raises(ValueError, match="loss_mask = 'all'.*assistant, final_only, last_turn"):
        render_segments(MASK_RECORD, loss_mask="all")
