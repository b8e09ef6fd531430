"""The repository's top-level kernels/ (Triton device code) is `align_ti.kernels` and never
shadows the environment's own `kernels` package (Hugging Face's kernel hub, which transformers
>= 5.25 requires and imports), wherever Python starts: pytest and `python -m align_ti...` in the
repository root put that root first on sys.path, and an installed wheel sits beside the real
`kernels` in site-packages."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.utils import ROOT, copy_project

KERNEL_MODULES = sorted(n for n in os.listdir(os.path.join(ROOT, "kernels")) if n.endswith(".py"))

# Prints where `kernels` and align_ti's device code came from, and imports what broke when our
# folder shadowed Hugging Face's (transformers.activations imports `kernels` at import time).
PROBE = (
    "import kernels, align_ti.kernels.fused_kl as ours, transformers.activations\n"
    "print('KERNELS', getattr(kernels, '__file__', None))\n"
    "print('OURS', ours.__file__)\n"
)


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _probe(cwd, env=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("KERNELS", "OURS")))


def _is_hub_kernels(path: str) -> bool:
    """The environment's `kernels` package: a regular package outside this repository."""
    return (path != "None" and path.endswith("__init__.py")
            and not os.path.abspath(path).startswith(os.path.join(ROOT, "")))


def test_kernels_folder_is_not_a_regular_package():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py")), \
        "kernels/__init__.py makes kernels/ shadow the environment's `kernels` package"
    assert KERNEL_MODULES, "kernels/ holds no device code"


@pytest.mark.skipif(not _hub_kernels_installed(), reason="Hugging Face `kernels` is not installed")
def test_repo_root_first_on_path_gives_the_environments_kernels():
    """In this pytest process (repo root first on sys.path) and in `python -c` started in the
    repo root (as `python -m align_ti.benchmarks...` is): `kernels` is Hugging Face's,
    `align_ti.kernels` is ours."""
    import kernels

    import align_ti.kernels.fused_kl as ours

    assert _is_hub_kernels(kernels.__file__), kernels.__file__
    assert hasattr(kernels, "__version__") or hasattr(kernels, "get_kernel"), dir(kernels)
    assert ours.__file__ == os.path.join(ROOT, "kernels", "fused_kl.py")
    seen = _probe(ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert _is_hub_kernels(seen["KERNELS"]), seen
    assert seen["OURS"] == os.path.join(ROOT, "kernels", "fused_kl.py"), seen


def test_wheel_installs_kernels_as_align_ti_kernels(tmp_path):
    """A wheel (what `pip install .` builds) carries kernels/*.py as align_ti/kernels/*.py, byte
    for byte, and nothing at a top-level `kernels/`; installed into a folder and imported from
    elsewhere, `align_ti.kernels` is the installed copy and `kernels` the environment's."""
    pytest.importorskip("setuptools")
    src, out, site = tmp_path / "src", tmp_path / "out", tmp_path / "site"
    src.mkdir()
    copy_project(src)  # a wheel build writes build/ beside setup.py: not in the checkout
    run = dict(capture_output=True, text=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(src)], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert not any(n.startswith("kernels/") for n in names), sorted(names)
        # every module of the source tree, subpackages included
        for folder, prefix in (("align_ti", "align_ti"), ("benchmarks", "align_ti/benchmarks")):
            for path in Path(ROOT, folder).rglob("*.py"):
                name = f"{prefix}/{path.relative_to(Path(ROOT, folder)).as_posix()}"
                assert name in names, f"the wheel lacks {name}"
        for mod in KERNEL_MODULES:
            with open(os.path.join(ROOT, "kernels", mod), "rb") as f:
                assert zf.read(f"align_ti/kernels/{mod}") == f.read(), mod
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                           str(site), str(wheel)], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = _probe(tmp_path, env=dict(os.environ, PYTHONPATH=str(site)))
    assert seen["OURS"] == str(site / "align_ti" / "kernels" / "fused_kl.py"), seen
    if _hub_kernels_installed():
        assert _is_hub_kernels(seen["KERNELS"]), seen
