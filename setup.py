"""Packaging for align-ti.

`kernels/` holds Triton device code and has no `__init__.py`, so that it never shadows the
environment's `kernels` package (Hugging Face's, imported by transformers) when the repository
root is on sys.path. It is installed as `align_ti.kernels`: the package `align_ti/kernels/`
finds the folder in a checkout (editable install) and build_py copies its modules in beside it
for a wheel (setuptools' editable finder cannot map a folder without `__init__.py` below a
regular package, hence no package_dir entry). `benchmarks/` is installed as
`align_ti.benchmarks` through package_dir, so that `align-ti bench` works from an installed
package.

The sources of the optional native CPU extension (CMakeLists.txt and csrc/ at the repository
root) are copied into the package as data, `align_ti/_native_src/` with the same layout, so
that `align-ti build-native` works from an installed package or wheel too (align_ti/native.py
`source_dir()`); MANIFEST.in puts them in the sdist. Nothing is compiled at install time.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_PACKAGE_DIR = os.path.join("align_ti", "_native_src")  # inside the installed package


def native_sources() -> list[str]:
    """The native extension's source files, relative to the repository root."""
    files = ["CMakeLists.txt"]
    for dirpath, _, names in os.walk(os.path.join(HERE, "csrc")):
        for name in sorted(names):
            if name.endswith((".cpp", ".h", ".hpp", ".cmake")):
                files.append(os.path.relpath(os.path.join(dirpath, name), HERE))
    return sorted(files)


def kernel_sources() -> list[str]:
    """The Triton device-code modules of kernels/, relative to the repository root."""
    return sorted(os.path.join("kernels", n) for n in os.listdir(os.path.join(HERE, "kernels"))
                  if n.endswith(".py"))


def copied_files() -> list[tuple[str, str]]:
    """(source relative to the repository root, destination relative to build_lib)."""
    pairs = [(rel, os.path.join(NATIVE_PACKAGE_DIR, rel)) for rel in native_sources()]
    pairs += [(rel, os.path.join("align_ti", rel)) for rel in kernel_sources()]
    return pairs


class build_py(_build_py):
    """build_py that also copies kernels/ into align_ti/kernels/ and the native sources into
    align_ti/_native_src/ (an editable install reads both from the checkout)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src, dst in copied_files():
            dst = os.path.join(self.build_lib, dst)
            self.mkpath(os.path.dirname(dst))
            self.copy_file(os.path.join(HERE, src), dst)

    def get_outputs(self, include_bytecode=True):
        outs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outs += [os.path.join(self.build_lib, dst) for _, dst in copied_files()]
        return outs


# torchvision pins the torch it was built for (0.26 <-> torch 2.11, the floor; 0.29 <-> 2.14): the
# cap keeps pip from pulling a newer torch in through a newer torchvision
VLM = "torchvision>=0.26,<0.30"

# every package under align_ti/ (a subpackage added later ships without editing this), and the
# benchmarks folder installed as align_ti.benchmarks
PACKAGES = find_packages(include=["align_ti", "align_ti.*"]) + ["align_ti.benchmarks"]

setup(
    name="align-ti",
    version="0.1.0",
    description="Fused kernels and a thin trainer for distilling multimodal LLMs with Align-TI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"align_ti.benchmarks": "benchmarks"},
    # Floors are versions that ran (README, "Supported versions"): torch and triton those of the
    # lent GPU machines' image, transformers and accelerate the CI tier "oldest" (transformers
    # 5.0 lacks what checkpoints use; accelerate 1.2 lacks what transformers 5.17's Trainer calls).
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17",
        "accelerate>=1.3",
        "numpy",
        "Pillow",
        "matplotlib",
        "PyYAML",
        "scipy>=1.15",  # the demo's paired tests (align_ti.train.demo.stats; its rng= keywords)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "cmake>=3.18", "ninja", VLM],
        # the processors of LLaVA-OneVision, Qwen2-VL / 2.5-VL / 3-VL and InternVL (their video
        # processors import torchvision); LLaVA's runs without it
        "vlm": [VLM],
        "bench": ["liger-kernel"],
        "flash": ["flash-attn"],
        # DeepSpeed ZeRO as the student's engine (configs/accelerate/zero3.yaml); its CPU test runs
        # in the dist tier when it is installed
        "deepspeed": ["deepspeed"],
    },
    entry_points={"console_scripts": ["align-ti = align_ti.cli:main"]},
    cmdclass={"build_py": build_py},
)
