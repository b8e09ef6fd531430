"""Packaging for align-ti.

`kernels/` holds Triton device code. It is installed as `align_ti.kernels` (package_dir) and
never as a top-level `kernels` package, which would shadow the PyPI package `kernels` that
transformers probes for. `benchmarks/` is installed as `align_ti.benchmarks` the same way, so
that `align-ti bench` works from an installed package.
"""
from setuptools import setup

PACKAGES = [
    "align_ti",
    "align_ti.reference",
    "align_ti.ops",
    "align_ti.models",
    "align_ti.data",
    "align_ti.train",
    "align_ti.kernels",
    "align_ti.benchmarks",
]

setup(
    name="align-ti",
    version="0.1.0",
    description="Fused kernels and a thin trainer for distilling multimodal LLMs with Align-TI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"align_ti.kernels": "kernels", "align_ti.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=5.0",
        "accelerate>=1.0",
        "numpy",
        "Pillow",
        "matplotlib",
        "PyYAML",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "cmake>=3.18", "ninja"],
        "bench": ["liger-kernel"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["align-ti = align_ti.cli:main"]},
)
