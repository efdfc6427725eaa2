"""GPT-OSS (20B, 120B and tiny presets), native PyTorch."""

from engine.models.gpt_oss.config import ConfigError, GptOssConfig, RopeScaling
from engine.models.gpt_oss.model import GptOssForCausalLM, GptOssModel, ModelOptions

__all__ = ["ConfigError", "GptOssConfig", "RopeScaling", "GptOssForCausalLM", "GptOssModel", "ModelOptions"]
