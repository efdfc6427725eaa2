"""Load a trained model for generation and evaluation, whatever the run left behind.

`load_for_inference(path, adapter=None)` accepts
- a run's output folder (its newest complete checkpoint is used),
- a training checkpoint `checkpoints/step_XXXXXXX` (rebuilt by engine.export.load_trained_model,
  LoRA adapters included, expert-parallel slices gathered),
- an HF checkpoint folder (config.json + safetensors, an export of ours or a published one),
and, for an HF folder, `adapter=` a PEFT adapter folder (ours or any with the same layout), which is
folded into the weights (engine.peft.peft_format describes the layout). The tokenizer is the run's
(`data.tokenizer` / the base model's), else the folder's tokenizer.json, else the shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object  # engine.data.tokenizer.HarmonyTokenizer
    source: str  # what was loaded, for the user


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _checkpoint_of(path: Path) -> Path | None:
    if not ((path / "meta.json").is_file() or (path / "checkpoints").is_dir()):
        return None  # not a run nor a training checkpoint: no torch.distributed.checkpoint import (~0.6 s)
    from engine.checkpoint.dcp import state as ckpt

    if ckpt.is_complete(path):
        return path
    if (path / "checkpoints").is_dir():
        newest = ckpt.resolve_resume(path, "auto")
        if newest is None:
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint yet")
        return newest
    return None


def load_for_inference(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str = "auto",
    expert_weights: str = "dense",
) -> Loaded:
    """`expert_weights="mxfp4"` keeps an MXFP4 HF checkpoint's experts packed (a PEFT adapter is then attached
    unmerged); a training checkpoint uses its run's own model.expert_weights."""
    from engine.data.tokenizer import load_tokenizer

    path = Path(path)
    dev = _device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    checkpoint = _checkpoint_of(path) if path.is_dir() else None
    if checkpoint is not None:
        if adapter is not None:
            raise ValueError(
                f"--adapter is for an HF base model; {checkpoint} is a training checkpoint that "
                "already holds its adapters"
            )
        from engine.export import load_trained_model
        from engine.training.build import resolve_tokenizer_path

        cfg, model = load_trained_model(checkpoint, dtype)
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg))
        source = f"training checkpoint {checkpoint}"
    elif (path / "config.json").is_file() or not path.exists():
        from engine.checkpoint.hf import load_hf
        from engine.checkpoint.hf.hub import resolve_checkpoint

        model = load_hf(path if path.exists() else str(path), dtype=dtype, expert_weights=expert_weights)
        local = resolve_checkpoint(str(path))
        tokenizer = load_tokenizer(local if (local / "tokenizer.json").is_file() else None)
        source = f"HF checkpoint {path}"
        if adapter is not None:
            if expert_weights == "mxfp4":  # packed experts take no fold: the adapters run as LoRA modules
                from engine.peft.peft_attach import attach_peft_adapter

                n = attach_peft_adapter(model, adapter)
            else:
                from engine.peft.peft_format import fold_peft_adapter

                n = fold_peft_adapter(model, adapter)
            source += f" + PEFT adapter {adapter} ({n} weights adapted)"
    else:
        raise FileNotFoundError(
            f"{path}: neither a run folder, a training checkpoint (meta.json) nor an HF checkpoint (config.json)"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids, the model "
            f"only {model.config.vocab_size}; put the model's tokenizer.json in {path}"
        )
    model.to(dev).eval()
    return Loaded(model, tokenizer, source)


__all__ = ["Loaded", "load_for_inference"]
