"""Shared test set-up.

- A fixed seed before every test.
- torch.empty / empty_like / Tensor.new_empty return NaN-filled floating tensors (and a
  large sentinel for integer ones), so an op that forgets to write part of its output fails
  instead of passing on lucky zeros.
- Markers: `gpu` tests are skipped without CUDA; `interpret` tests are Triton kernel tests
  that run in their own tier (TRITON_INTERPRET=1 set before triton is imported, see
  scripts/test.sh) or on CUDA; `e2e` tests form the end-to-end tier.
- Fixtures of the tiny models and data: `processor` (session) and `tiny` (per module: teacher,
  student, processor, synthetic data); the builders behind them are in tests/utils.py.
"""
import functools
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _poison(t: torch.Tensor) -> torch.Tensor:
    # no_grad: `new_empty(..., requires_grad=True)` gives a leaf that autograd would not let
    # us fill in place (torch's own flex_attention makes one)
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.uint8 else 255)
    return t


def _poisoned(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _poison(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_interp = pytest.mark.skip(
        reason="Triton kernel test: run in the interpreter tier (TRITON_INTERPRET=1) or on CUDA"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not (INTERPRET or HAS_CUDA):
            item.add_marker(skip_interp)


@pytest.fixture(scope="session")
def processor():
    """The built-in tiny processor (tokenizer, image processor, chat template); read-only."""
    from align_ti.models.tiny import build_processor

    return build_processor()


@pytest.fixture(scope="module")
def tiny():
    """A `tests.utils.TinyRun` per test module: the tiny teacher/student pair, their processor
    and 3 synthetic images' training data. Train a copy of the student (copy.deepcopy)."""
    from tests.utils import tiny_run

    return tiny_run()
