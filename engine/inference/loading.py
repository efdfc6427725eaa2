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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint.dcp import state as ckpt

PEFT_PREFIX = "base_model.model."


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
    if ckpt.is_complete(path):
        return path
    if (path / "checkpoints").is_dir():
        newest = ckpt.resolve_resume(path, "auto")
        if newest is None:
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint yet")
        return newest
    return None


def load_for_inference(path: str | Path, *, adapter: str | Path | None = None, dtype: torch.dtype | None = None,
                       device: str = "auto") -> Loaded:
    from engine.data import load_tokenizer

    path = Path(path)
    dev = _device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    checkpoint = _checkpoint_of(path) if path.is_dir() else None
    if checkpoint is not None:
        if adapter is not None:
            raise ValueError(f"--adapter is for an HF base model; {checkpoint} is a training checkpoint that "
                             "already holds its adapters")
        from engine.training.build import resolve_tokenizer_path
        from engine.export import load_trained_model

        cfg, model = load_trained_model(checkpoint, dtype)
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg))
        source = f"training checkpoint {checkpoint}"
    elif (path / "config.json").is_file() or not path.exists():
        from engine.checkpoint.hf import load_hf
        from engine.checkpoint.hf.hub import resolve_checkpoint

        model = load_hf(path if path.exists() else str(path), dtype=dtype)
        local = resolve_checkpoint(str(path))
        tokenizer = load_tokenizer(local if (local / "tokenizer.json").is_file() else None)
        source = f"HF checkpoint {path}"
        if adapter is not None:
            n = fold_peft_adapter(model, adapter)
            source += f" + PEFT adapter {adapter} ({n} weights adapted)"
    else:
        raise FileNotFoundError(f"{path}: neither a run folder, a training checkpoint (meta.json) nor an HF "
                                "checkpoint (config.json)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids, the model "
                         f"only {model.config.vocab_size}; put the model's tokenizer.json in {path}")
    model.to(dev).eval()
    return Loaded(model, tokenizer, source)


def _targets_param(module: str, proj: str, targets: list[str]) -> bool:
    full = f"{module}.{proj}"
    return any(full == t or full.endswith("." + t) for t in targets)


@torch.no_grad()
def fold_peft_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> int:
    """Add scaling * B A of every adapter in a PEFT folder to the model's weights; returns how many
    weights changed. Attention adapters are plain LoRA; expert adapters are peft's ParamWrapper
    layout (lora_A [E*r, in], lora_B [out, r*E])."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; --adapter takes a PEFT adapter folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type={cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(weights_file))
    params = dict(model.named_parameters())
    targets = list(cfg.get("target_parameters") or [])
    e_total = model.config.num_local_experts
    done = 0
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        if f"{module}.weight" in params:  # a linear layer: W [out, in] += s * B [out, r] A [r, in]
            w = params[f"{module}.weight"]
            w.add_((scaling * b @ a).to(w.dtype))
        else:
            experts = module.removesuffix(".base_layer")
            chosen = [p for p in ("gate_up_proj", "down_proj") if _targets_param(experts, p, targets)]
            proj = "gate_up_proj" if module.endswith(".base_layer") or chosen == ["gate_up_proj"] else "down_proj"
            name = f"{experts}.{proj}"
            if name not in params or not chosen:
                raise ValueError(f"{weights_file}: adapter {key} matches no weight of this model")
            w = params[name]  # [E, in, out]
            a_e = a.view(e_total, r, -1).transpose(1, 2)  # [E, in, r]
            b_e = b.view(b.shape[0], r, e_total).permute(2, 1, 0)  # [E, r, out]
            if a_e.shape[1] != w.shape[1] or b_e.shape[2] != w.shape[2]:
                raise ValueError(f"{weights_file}: {key} has shapes {tuple(a.shape)}/{tuple(b.shape)}, which do "
                                 f"not fit {name} {tuple(w.shape)}")
            w.add_((scaling * a_e @ b_e).to(w.dtype))
        done += 1
    if done == 0:
        raise ValueError(f"{weights_file}: no lora_A/lora_B tensors found")
    return done


__all__ = ["Loaded", "load_for_inference", "fold_peft_adapter"]
