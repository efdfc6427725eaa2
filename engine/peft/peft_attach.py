"""A PEFT adapter folder attached as live LoRA modules instead of folded into the weights: what a base whose
experts stay packed as MXFP4 (model.expert_weights=mxfp4) needs, since nothing can be added to packed bytes.

The folder is read in the layout `engine.peft.peft_format` writes and peft loads (attention lora_A [r, in] /
lora_B [out, r]; experts lora_A [E*r, in], lora_B [out, r*E], gate_up nested as `experts.base_layer` when
both projections are adapted), and the adapters computed unmerged: y = x W + scaling * (x A) B.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.peft.config import EXPERT_TARGETS, LoraConfig
from engine.peft.lora import apply_lora, lora_state_dict
from engine.peft.peft_format import PEFT_PREFIX, read_adapter_config


def _read(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_file, cfg, weights_file = read_adapter_config(adapter_dir)
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{cfg_file}: {key} is set; attaching takes one rank and one alpha for every adapter")
    return cfg, load_file(str(weights_file))


def _targets(cfg: dict) -> list[str]:
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    for param in cfg.get("target_parameters") or []:
        targets.append(param)  # `mlp.experts.gate_up_proj` matches as a name ending
    if not targets:
        raise ValueError("the adapter's config names no target_modules or target_parameters")
    return targets


@torch.no_grad()
def attach_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> int:
    """Add the adapters of a PEFT folder to `model` as LoRA modules (frozen base, adapters in the model's
    dtype); returns how many weights are adapted. Every tensor of the folder must find its place."""
    adapter_dir = Path(adapter_dir)
    cfg, tensors = _read(adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    lora = LoraConfig(rank=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora")), target_modules=_targets(cfg))
    apply_lora(model, lora)
    ours = lora_state_dict(model)
    e = model.config.num_local_experts
    filled: set[str] = set()
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        if f"{module}.lora_A" in ours:  # attention: our LoraLinear has peft's orientation
            pairs = {f"{module}.lora_A": a, f"{module}.lora_B": b}
        else:
            experts = module.removesuffix(".base_layer")
            adapted = [p for p in EXPERT_TARGETS if f"{experts}.lora.{p.removesuffix('_proj')}_A" in ours]
            proj = "gate_up_proj" if module.endswith(".base_layer") or adapted == ["gate_up_proj"] else "down_proj"
            stem = f"{experts}.lora.{proj.removesuffix('_proj')}"
            if f"{stem}_A" not in ours:
                raise ValueError(f"{adapter_dir}: adapter {key} matches no weight of this model")
            pairs = {
                f"{stem}_A": a.view(e, r, -1).transpose(1, 2),  # [E*r, in] -> [E, in, r]
                f"{stem}_B": b.view(b.shape[0], r, e).permute(2, 1, 0),  # [out, r*E] -> [E, r, out]
            }
        for name, value in pairs.items():
            if tuple(ours[name].shape) != tuple(value.shape):
                raise ValueError(
                    f"{adapter_dir}: {key} gives {name} shape {tuple(value.shape)}, "
                    f"the model has {tuple(ours[name].shape)}"
                )
            ours[name].copy_(value)
            filled.add(name)
    missing = sorted(set(ours) - filled)
    if missing:
        raise ValueError(f"{adapter_dir}: no tensor for {len(missing)} adapters of its own config, e.g. {missing[:3]}")
    return len(filled) // 2
