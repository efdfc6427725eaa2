"""Parameter-efficient fine-tuning: LoRA on GPT-OSS attention and experts (adapters.py, lora.py), its startup
report (report.py), and the PEFT format in and out (peft_format.py)."""

from engine.peft.config import LoraConfig
from engine.peft.lora import apply_lora, lora_state_dict, merge_lora, unmerge_lora
from engine.peft.report import format_report, lora_report

__all__ = ["LoraConfig", "apply_lora", "merge_lora", "unmerge_lora", "lora_state_dict", "lora_report", "format_report"]
