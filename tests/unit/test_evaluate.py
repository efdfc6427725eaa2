"""engine.evaluate: per-mask / per-channel losses against a full-logits reference, channel tags read
from the tokens, the trainer's validation, and the CLI (exit codes, file:line errors)."""

import json

import pytest
import torch
import torch.nn.functional as F

from engine.data.config import default_sample_paths
from engine.data.harmony import render_segments
from engine.data.tokenizer import load_tokenizer
from engine.evaluate import main
from engine.inference.evaluate import channel_tags, evaluate_records, read_records
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.training.validation import validation_loss

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4.", "thinking": "Add two and two."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    },
    {"prompt": "Name a colour.", "completion": "Blue."},
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig.from_preset("tiny"), attn_backend="eager")
    model.init_weights(seed=3)
    with torch.no_grad():  # larger weights than the init, so the losses differ between tokens
        model.lm_head.weight.normal_(0, 0.3)
    return model.eval(), load_tokenizer()


def test_channel_tags_follow_the_harmony_structure(tiny):
    _, tok = tiny
    text = (
        "<|start|>user<|message|>Weather?<|end|><|start|>assistant<|channel|>analysis<|message|>Need a tool."
        "<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
        '{"city": "Paris"}<|call|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>'
    )
    ids = tok.encode(text)
    tags = channel_tags(ids, tok)
    text_of = {name: tok.decode([i for i, t in zip(ids, tags) if t == name]) for name in set(tags) - {None}}
    # What the model writes: headers after the caller's `<|start|>assistant`, and `<|start|>assistant`
    # itself after its own `<|end|>` (not after `<|call|>`: the caller resumes there).
    assert text_of == {
        "analysis": "<|channel|>analysis<|message|>Need a tool.<|end|>",
        "tool_calls": (
            '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
        ),
        "final": "<|channel|>final<|message|>Sunny.<|return|>",
    }


def test_groups_equal_a_full_logits_reference(tiny):
    model, tok = tiny
    result = evaluate_records(model, tok, RECORDS, batch_size=2)
    sums: dict[str, list] = {}
    for record in RECORDS:
        ids, assistant = tok.encode_segments(render_segments(record, loss_mask="assistant"))
        _, final = tok.encode_segments(render_segments(record, loss_mask="final_only"))
        ids_t = torch.as_tensor(ids)[None]
        with torch.no_grad():
            per_token = F.cross_entropy(model(ids_t)[0, :-1].double(), ids_t[0, 1:], reduction="none")
        for name, flags in (("mask/assistant", assistant), ("mask/final_only", final)):
            sel = torch.as_tensor(flags[1:])
            sums.setdefault(name, []).append((per_token[sel].sum().item(), int(sel.sum())))
        sums.setdefault("all", []).append((per_token.sum().item(), len(ids) - 1))
    for name, parts in sums.items():
        n = sum(c for _, c in parts)
        assert result[name]["tokens"] == n
        assert result[name]["loss"] == pytest.approx(sum(s for s, _ in parts) / n, rel=1e-5)
    # final_only trains every final answer (history included), exactly the final-channel tokens
    assert result["channel/final"]["tokens"] == result["mask/final_only"]["tokens"]
    assert result["channel/analysis"]["tokens"] > 0
    assert result["mask/assistant"]["tokens"] == (
        result["channel/analysis"]["tokens"] + result["channel/final"]["tokens"]
    )


def test_validation_loss_equals_the_training_loss_path(tiny):
    from engine.data.batch import Batch
    from engine.parallel import Mesh
    from engine.training.runtime import Runtime

    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 1000, (2, 24), generator=g)
        labels = torch.where(torch.rand(2, 24, generator=g) < 0.6, torch.roll(ids, -1, 1), torch.tensor(-100))
        batches.append(
            Batch(
                input_ids=ids,
                labels=labels,
                position_ids=torch.arange(24).expand(2, 24),
                doc_ids=None,
                num_target_tokens=int((labels != -100).sum()),
            )
        )
    rt = Runtime(Mesh.single("cpu"), param_dtype=torch.float32, compute_dtype=torch.float32)
    model.train()
    got = validation_loss(model, batches, rt)
    assert model.training  # restored
    with torch.no_grad():
        total = sum(model(b.input_ids, labels=b.labels, loss_normalizer=1.0).item() for b in batches)
    assert got == pytest.approx(total / sum(b.num_target_tokens for b in batches), rel=1e-6)
    model.eval()


def test_cli_on_an_hf_folder(tiny, tmp_path, capsys):
    from engine.checkpoint.hf import save_hf

    model, _ = tiny
    save_hf(model, tmp_path / "hf", dtype=torch.float32)
    out = tmp_path / "eval.json"
    _, val = default_sample_paths()
    assert main([str(tmp_path / "hf"), "--data", str(val), "--out", str(out)]) == 0
    assert "mask/assistant" in capsys.readouterr().out
    saved = json.loads(out.read_text())["groups"]
    ref = evaluate_records(model, load_tokenizer(), read_records(val))
    assert saved["mask/assistant"]["loss"] == pytest.approx(ref["mask/assistant"]["loss"], rel=1e-6)
    assert saved["mask/assistant"]["tokens"] > 100


def test_cli_errors_name_file_and_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert main([str(tmp_path), "--data", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--data", str(bad)]) == 2
