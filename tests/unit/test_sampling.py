"""trainer.sample_prompts files, and the batched greedy samples equal each prompt answered alone."""

import json

import pytest
import torch

from engine.data.tokenizer import load_tokenizer
from engine.inference.chat import prompt_ids
from engine.inference.generate import generate
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.training.samples import load_sample_prompts, sample


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("What is 2 + 2?\n\n  Name a colour.  \n")
    assert [p["messages"] for p in load_sample_prompts(txt)] == [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "user", "content": "Name a colour."}],
    ]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"prompt": "Hi", "reasoning_effort": "low"})
        + "\n"
        + json.dumps({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Bye"}]})
        + "\n"
    )
    got = load_sample_prompts(jl)
    assert got[0] == {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "low"}
    assert got[1]["messages"][-1] == {"role": "user", "content": "Bye"} and got[1]["reasoning_effort"] == "medium"
    jl.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "assistant"}]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected"):
        load_sample_prompts(jl)
    with pytest.raises(FileNotFoundError, match="trainer.sample_prompts"):
        load_sample_prompts(tmp_path / "none.txt")


def test_batched_samples_equal_each_prompt_alone():
    tok = load_tokenizer()
    model = GptOssForCausalLM(GptOssConfig.from_preset("tiny"), attn_backend="eager")
    model.init_weights(seed=2)
    prompts = [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        {"messages": [{"role": "user", "content": "Reverse the word 'mirror', please."}], "reasoning_effort": "high"},
    ]
    texts = sample(model, tok, prompts, 10)
    stops = {tok.special_ids["<|return|>"], tok.special_ids["<|call|>"]}
    for p, text in zip(prompts, texts):
        ids = torch.tensor([prompt_ids(p["messages"], tok, reasoning=p.get("reasoning_effort", "medium"))])
        alone = generate(model, ids, 10)[0, ids.shape[1] :].tolist()
        end = next((i + 1 for i, t in enumerate(alone) if t in stops), len(alone))  # the answer ends at a stop
        assert text == tok.decode(alone[:end])
