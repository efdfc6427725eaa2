"""Triton expert kernels for GPT-OSS MoE training; see kernels/README.md.

Public entry points: kernels.moe_experts.expert_mlp, kernels.grouped_linear.grouped_linear,
kernels.scatter_combine.scatter_combine; torch references in kernels.reference. Nothing is
imported here, so `import kernels.reference` works without Triton.
"""
