"""Lazy public names for a package (PEP 562): each is imported from its module on first use."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, table: dict[str, str], namespace: dict):
    """-> (__getattr__, __dir__) for `package`, resolving names through `table` (name -> module)
    and caching each resolved value in the package's `namespace`."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(list(namespace) + list(table))

    return __getattr__, __dir__
