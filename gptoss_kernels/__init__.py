"""Triton expert kernels for GPT-OSS MoE training; see gptoss_kernels/README.md.

Public entry points: gptoss_kernels.moe_experts.expert_mlp, gptoss_kernels.grouped_linear.grouped_linear,
gptoss_kernels.scatter_combine.scatter_combine; torch references in gptoss_kernels.reference. Nothing is
imported here, so `import gptoss_kernels.reference` works without Triton.
"""
