"""The one check of an output folder, shared by every `align-ti` subcommand.

A run that fails to write its results after minutes of work (or a traceback from deep inside
``os.makedirs``) is worse than a refusal at the start, so each subcommand checks the folder it
will write into before it loads a model: it is created if missing and a file is written into it
and removed. Root ignores permission bits, so the write is tried rather than ``os.access`` asked;
a read-only mount, ``/proc`` or ``/sys`` fail it for root too. Only the standard library here:
``align-ti --help`` must stay instant.
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["ensure_writable_dir"]


def ensure_writable_dir(path, name: str) -> str:
    """Create folder ``path`` (with its parents) if missing and check that a file can be written
    in it; return ``path`` as a string.

    Raises ValueError, one line, naming ``name`` (the flag or config key the path came from, e.g.
    ``"--out"`` or ``"output_dir"``), the path and the OS reason (e.g. "Read-only file system").
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{name} {path!r}: cannot create the folder: {_reason(e, path)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".align-ti-write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{name} {path!r}: cannot write in the folder: {e.strerror or e}") from None
    return path


def _reason(e: OSError, path: str) -> str:
    """The OS's words, plus the folder that could not be made when it is a parent of ``path``
    (one under a regular file or on a read-only mount)."""
    reason = e.strerror or str(e)
    failed = os.path.abspath(os.fspath(e.filename)) if e.filename is not None else None
    parent = os.path.dirname(failed or os.path.abspath(path))
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        reason += f" ({parent!r} is a file)"
    elif failed is not None and failed != os.path.abspath(path):
        reason += f" (at {failed!r})"
    return reason
