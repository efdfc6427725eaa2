"""Parameter-efficient fine-tuning: LoRA on GPT-OSS attention and experts, its report and exports."""

from engine.peft.config import LoraConfig
from engine.peft.lora import apply_lora, load_lora_state_dict, lora_state_dict, merge_lora, unmerge_lora
from engine.peft.report import format_report, lora_report

__all__ = ["LoraConfig", "apply_lora", "merge_lora", "unmerge_lora", "lora_state_dict", "load_lora_state_dict",
           "lora_report", "format_report"]
