"""The allowed values of the settings that choose an implementation or a mode, free of torch so that
reading a config, `--help` and a config error cost no torch import. Beside each: the setting and the
module that acts on it (attention, experts and fsdp check their argument against the same tuple).
"""

ATTN_BACKENDS = ("eager", "flex", "blockwise", "triton")  # model.attn_backend: engine.models.gpt_oss.attention
EXPERT_BACKENDS = ("loop", "grouped_mm", "triton")  # model.experts_backend: engine.moe.backends
EXPERT_WEIGHTS = ("dense", "mxfp4")  # model.expert_weights: engine.moe.experts
SHARD_MODES = ("none", "optimizer", "full")  # parallel.shard: engine.parallel.fsdp
PEFT_METHODS = ("none", "lora")  # peft.method, full fine-tuning or LoRA: engine.peft.config
SCHEDULES = ("cosine", "constant")  # optim.schedule after the warmup: engine.training.optim
OPTIMIZER_IMPLS = ("auto", "torch", "apex")  # optim.impl: engine.training.optim
MODEL_DTYPES = ("auto", "bfloat16", "float32")  # model.dtype: engine.training.runtime
DEVICES = ("auto", "cpu", "cuda")  # trainer.device: engine.training.runtime
