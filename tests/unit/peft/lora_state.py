"""Loading adapter tensors saved by engine.peft.lora_state_dict back into a model: the tests' round trip of
the adapters' names and shapes (the engine restores adapters through its training checkpoints)."""

import torch
from torch import nn

from engine.peft.adapters import adapter_modules
from engine.peft.lora import lora_state_dict


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by lora_state_dict into the adapters; names and shapes must match exactly."""
    own = lora_state_dict(model)
    if any(a.merged for _, a, _ in adapter_modules(model)):
        raise RuntimeError("cannot load adapters into a merged model; call unmerge_lora first")
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"LoRA state dict does not match the model's adapters: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{' ...' if len(unexpected) > 4 else ''} (was it saved with the same peft.target_modules "
            "and peft.share_expert_adapters?)"
        )
    for name, p in own.items():
        if tuple(sd[name].shape) != tuple(p.shape):
            raise ValueError(
                f"LoRA tensor {name}: saved shape {tuple(sd[name].shape)} != model's {tuple(p.shape)} "
                "(different peft.rank or expert-parallel slice?)"
            )
        p.copy_(sd[name])
