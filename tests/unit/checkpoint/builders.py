"""Tiny GPT-OSS checkpoints for the checkpoint tests, written on the fly: HF BF16/FP32 via transformers'
`save_pretrained`, MXFP4 by quantizing a tiny model's experts the way the published checkpoints are
stored (blocks + scales, (out, in) orientation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint.hf.mxfp4 import quantize_mxfp4
from tests.hf_reference import hf_config, hf_model

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": "{}",
    "chat_template.jinja": "{{ messages }}",
    "generation_config.json": '{"do_sample": true}',
}
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tiny_hf(seed: int = 0, **cfg):
    """A random fp32 transformers GPT-OSS model in eager mode (see tests/hf_reference.py)."""
    return hf_model(hf_config(**cfg), seed=seed)


def load_transformers(directory, **kw):
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager", **kw)
    model.config._experts_implementation = "eager"
    return model.eval()


def token_ids(vocab: int = 128, batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def write_side_files(directory: Path) -> None:
    for name, text in SIDE_FILES.items():
        (Path(directory) / name).write_text(text)


def write_mxfp4_checkpoint(hf, directory: Path) -> Path:
    """Store `hf`'s expert weights as MXFP4 blocks/scales (transposed to (out, in) first, as published)."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    tensors = {}
    for name, t in hf.state_dict().items():
        if name.endswith(EXPERT_WEIGHTS):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory
