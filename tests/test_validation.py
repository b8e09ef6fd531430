"""The shared input checks: every error names the argument and shows what was given."""
import pytest
import torch

from align_ti import validation as v


def test_check_tensor_messages():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        v.check_tensor("x", [1, 2])
    with pytest.raises(ValueError, match=r"x must be 2-D or 3-D, got shape \[4\]"):
        v.check_tensor("x", torch.zeros(4), ndim=(2, 3))
    with pytest.raises(TypeError, match="x must have dtype in .*int64.*got \\[2\\] float32"):
        v.check_tensor("x", torch.zeros(2), dtypes=(torch.int64,))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        v.check_tensor("x", torch.zeros(2, dtype=torch.long), floating=True)


def test_shape_dim_dtype_device_checks():
    with pytest.raises(ValueError, match=r"w has size 3 in dim 1 \(shape \[2, 3\]\), but the width of h is 4"):
        v.check_dim("w", torch.zeros(2, 3), 1, 4, "the width of h")
    with pytest.raises(ValueError, match="a must have the same shape as b"):
        v.check_same_shape("a", torch.zeros(2), "b", torch.zeros(3))
    with pytest.raises(TypeError, match="a and b must share one dtype"):
        v.check_same_dtype("a", torch.zeros(2), "b", torch.zeros(2, dtype=torch.half))
    assert v.check_same_device({"a": torch.zeros(1), "b": None}) == torch.device("cpu")
    with pytest.raises(ValueError, match="meta.*all inputs must be on one device"):
        v.check_same_device({"a": torch.zeros(1), "b": torch.zeros(1, device="meta")})


def test_option_checks():
    with pytest.raises(ValueError, match="mode must be one of"):
        v.check_choice("mode", "x", ["a", "b"])
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="temperature"):
            v.check_positive("temperature", bad)
    for bad in (0, 1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            v.check_open_unit("beta", bad)


def test_value_checks_and_switch():
    idx = torch.tensor([0, 5, -100])
    with pytest.raises(ValueError, match=r"idx has entries outside \[0, 5\)"):
        v.check_index_range("idx", idx, 5, "n", allow=-100)
    v.check_index_range("idx", torch.tensor([0, 4, -100]), 5, "n", allow=-100)
    with pytest.raises(ValueError, match="w must be >= 0"):
        v.check_finite_nonnegative("w", torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="w must be finite"):
        v.check_finite_nonnegative("w", torch.tensor([1.0, float("inf")]))
    v.set_value_checks(False)
    try:
        v.check_index_range("idx", idx, 5, "n")  # skipped while off
        assert not v.value_checks_enabled()
    finally:
        v.set_value_checks(True)
    assert v.value_checks_enabled()


def test_normalize_rows():
    assert v.normalize_rows(None, 4, torch.device("cpu")) is None
    mask = torch.tensor([True, False, True])
    assert v.normalize_rows(mask, 3, torch.device("cpu")) is mask
    assert v.normalize_rows(torch.tensor([2, 0], dtype=torch.int32), 3, torch.device("cpu")).dtype == torch.int64
    with pytest.raises(ValueError, match="rows has size 2 in dim 0"):
        v.normalize_rows(torch.tensor([True, False]), 3, torch.device("cpu"))
    with pytest.raises(TypeError, match="rows must be int64 indices or a bool mask"):
        v.normalize_rows(torch.tensor([0.0]), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="rows has entries outside"):
        v.normalize_rows(torch.tensor([3]), 3, torch.device("cpu"))
