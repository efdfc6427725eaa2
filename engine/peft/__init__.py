"""Parameter-efficient fine-tuning: LoRA on GPT-OSS attention and experts (adapters.py, lora.py), its startup
report (report.py), and the PEFT format in and out (peft_format.py).

The names below load on first use (PEP 562), so `engine.peft.config` (the peft section of the training
config) is read without importing torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "LoraConfig": "engine.peft.config",
    "apply_lora": "engine.peft.lora",
    "merge_lora": "engine.peft.lora",
    "unmerge_lora": "engine.peft.lora",
    "lora_state_dict": "engine.peft.lora",
    "lora_report": "engine.peft.report",
    "format_report": "engine.peft.report",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
