"""The optional native CPU extension: build, cache and load.

The fused KL's per-chunk step is the custom op ``align_ti::kl_chunk`` and its read-only twin
``align_ti::kl_chunk_into`` (schemas and PyTorch default implementations in
`align_ti.ops.fused_kl.chunk_op`, which does not import this module). The C++ kernel in
``csrc/fused_kl_cpu.cpp`` overrides both for CPU tensors once its shared library is loaded.

- `build()` (or ``align-ti build-native``) configures ``CMakeLists.txt`` with CMake + Ninja
  against the torch that is installed now (no build isolation, so the ABI matches) and puts
  ``libalign_ti_native.so`` in the cache. ``pip install`` never compiles anything; it ships
  the sources as package data (``align_ti/_native_src/``, see `source_dir()`).
- The cache is ``$ALIGN_TI_NATIVE_DIR`` or ``~/.cache/align_ti/native`` (``$XDG_CACHE_HOME``
  respected), one folder per torch version and, inside it, per CPU capability and source
  hash: a torch upgrade or a source change simply finds no build.
- `native_available()` loads the cached build on first use (it never builds) and says whether
  the kernel is registered. A build that fails to load gives one warning and the PyTorch path.
- ``ALIGN_TI_NATIVE=0`` (or `set_enabled(False)`) keeps the PyTorch path even when loaded.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

LIB_NAME = "libalign_ti_native.so"
_SOURCES = ("CMakeLists.txt", os.path.join("csrc", "fused_kl_cpu.cpp"))

_loaded_path: str | None = None
_tried = False
_error: str | None = None
_enabled_override: bool | None = None


# --------------------------------------------------------------------------------------------
# where things are
# --------------------------------------------------------------------------------------------

# An installed package (wheel, ``pip install .``) carries the sources as package data in
# ``align_ti/_native_src/`` (setup.py's build_py copies them there, same layout); a checkout
# or an editable install uses CMakeLists.txt and csrc/ at the repository root.
PACKAGED_SOURCES = "_native_src"


def _has_sources(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, rel)) for rel in _SOURCES)


def source_dir() -> str:
    """The folder holding CMakeLists.txt and csrc/: ``$ALIGN_TI_NATIVE_SRC``, else the copy
    shipped inside the installed package, else the checkout root."""
    env = os.environ.get("ALIGN_TI_NATIVE_SRC")
    if env:
        return os.path.abspath(env)
    here = os.path.dirname(os.path.abspath(__file__))
    packaged = os.path.join(here, PACKAGED_SOURCES)
    if _has_sources(packaged):
        return packaged
    return os.path.dirname(here)


def _source_hash(src: str) -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        path = os.path.join(src, rel)
        try:
            with open(path, "rb") as f:
                h.update(rel.encode() + b"\0" + f.read())
        except OSError:
            h.update(rel.encode() + b"\0missing")
    return h.hexdigest()[:12]


def cache_root() -> str:
    env = os.environ.get("ALIGN_TI_NATIVE_DIR")
    if env:
        return os.path.abspath(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "align_ti", "native")


def cache_dir() -> str:
    """``<cache root>/torch-<version>/<cpu capability>-<source hash>``."""
    import torch

    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = "cpu"
    return os.path.join(cache_root(), f"torch-{torch.__version__}", f"{cap}-{_source_hash(source_dir())}")


def library_path() -> str:
    return os.path.join(cache_dir(), LIB_NAME)


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------

def _tool(name: str) -> str | None:
    """A build tool on PATH, or next to this Python (a venv's pip-installed cmake/ninja)."""
    found = shutil.which(name)
    if found:
        return found
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    try:  # the PyPI `cmake` / `ninja` packages expose their binaries' folders
        mod = __import__(name)
        for attr in ("CMAKE_BIN_DIR", "BIN_DIR"):
            d = getattr(mod, attr, None)
            if d and os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    except Exception:
        pass
    return None


def build(force: bool = False, verbose: bool = False, jobs: int | None = None) -> str:
    """Build the extension for the installed torch (if not cached yet) and load it.

    Returns the path of the shared library. Raises RuntimeError with the tail of the build
    log when CMake, Ninja or the compiler are missing or fail, and ValueError when the cache
    folder ($ALIGN_TI_NATIVE_DIR, default ~/.cache/align_ti/native) cannot be written.
    """
    import torch

    src = source_dir()
    if not os.path.isfile(os.path.join(src, "CMakeLists.txt")):
        raise RuntimeError(
            f"native build: no CMakeLists.txt under {src} (an installed align-ti carries its "
            f"sources in align_ti/{PACKAGED_SOURCES}/); reinstall align-ti, or point "
            "ALIGN_TI_NATIVE_SRC at a source checkout")
    out = library_path()
    if os.path.isfile(out) and not force:
        load(out)
        return out
    from align_ti.paths import ensure_writable_dir

    ensure_writable_dir(os.path.dirname(out), "native cache folder ($ALIGN_TI_NATIVE_DIR)")
    cmake, ninja = _tool("cmake"), _tool("ninja")
    missing = [n for n, p in (("cmake", cmake), ("ninja", ninja)) if p is None]
    if missing:
        raise RuntimeError(f"native build needs {' and '.join(missing)} (pip install cmake ninja)")
    work = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(out))
    log_path = os.path.join(os.path.dirname(out), "build.log")
    cmds = [
        [cmake, "-S", src, "-B", work, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
         f"-DALIGN_TI_TORCH_DIR={os.path.dirname(os.path.abspath(torch.__file__))}",
         f"-DALIGN_TI_CXX11_ABI={int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))}",
         "-DCMAKE_BUILD_TYPE=Release"],
        [cmake, "--build", work] + (["-j", str(jobs)] if jobs else []),
    ]
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            for cmd in cmds:
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                log.write(proc.stdout)
                if verbose:
                    print(proc.stdout, end="")
                if proc.returncode != 0:
                    reason = cmake_error(proc.stdout)
                    if reason:  # CMakeLists.txt's own check (e.g. the C++ standard torch needs)
                        raise RuntimeError(f"native build failed: {reason} (log {log_path})")
                    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
                    raise RuntimeError(f"native build failed ({' '.join(cmd[:2])}...); log {log_path}:\n{tail}")
        os.replace(os.path.join(work, LIB_NAME), out)  # atomic: concurrent builders are safe
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if verbose:
        print(f"built {out} in {time.perf_counter() - t0:.1f} s")
    load(out)
    return out


def cmake_error(output: str) -> str | None:
    """The first ``CMake Error`` message in CMake's output as one line (CMake indents and wraps
    a FATAL_ERROR message below its "CMake Error at FILE:LINE" header), or None."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() == "" and body:
                    break
                if nxt.strip():
                    body.append(nxt.strip())
            return " ".join(body) or line.strip()
    return None


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def load(path: str | None = None) -> bool:
    """Load the extension (default: the cached build for this torch). True when the CPU kernel
    of ``align_ti::kl_chunk`` is registered. A missing build returns False quietly; a build
    that fails to load warns once and returns False (the PyTorch path is used)."""
    global _loaded_path, _tried, _error
    if _loaded_path is not None:
        return True
    path = path or library_path()
    _tried = True
    if not os.path.isfile(path):
        _error = f"not built (no {path}); run `align-ti build-native`"
        return False
    try:
        import torch

        import align_ti.ops.fused_kl.chunk_op  # noqa: F401  (defines the op schemas first)

        torch.ops.load_library(path)
        for op in ("align_ti::kl_chunk", "align_ti::kl_chunk_into"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
                raise RuntimeError(f"the library registered no CPU kernel for {op}")
    except Exception as e:  # a broken / incompatible build: fall back, say so once
        _error = f"{type(e).__name__}: {e}"
        warnings.warn(f"align_ti: native CPU kernel {path} failed to load ({_error}); "
                      "using the PyTorch path", RuntimeWarning, stacklevel=2)
        return False
    _loaded_path = path
    _error = None
    return True


def native_available() -> bool:
    """Whether the native CPU kernel is loaded (loading the cached build on first call)."""
    if _loaded_path is None and not _tried:
        load()
    return _loaded_path is not None


def set_enabled(flag: bool | None) -> None:
    """Force the native kernel on (when loaded) or off; None = the ``ALIGN_TI_NATIVE`` default."""
    global _enabled_override
    _enabled_override = flag


def enabled() -> bool:
    """Whether the fused KL's torch path should dispatch its chunks to the native kernel."""
    if _enabled_override is not None:
        return _enabled_override and native_available()
    if os.environ.get("ALIGN_TI_NATIVE", "1") == "0":
        return False
    return native_available()


def info() -> dict:
    """What `align-ti build-native` / `align-ti env` report."""
    return {"available": native_available(), "path": _loaded_path or library_path(),
            "error": _error}


__all__ = ["build", "load", "native_available", "enabled", "set_enabled", "library_path",
           "cache_dir", "source_dir", "info"]
