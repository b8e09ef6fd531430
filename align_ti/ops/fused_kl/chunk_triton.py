"""The per-chunk step on the Triton row kernel (`align_ti.kernels.fused_kl.fused_kl_rows_kernel`,
one program per row, the vocabulary streamed in BLOCK_V-wide blocks): `chunk_torch`'s contract
on CUDA, or on CPU under TRITON_INTERPRET=1. topk_align's gather driver launches it too.
"""
from __future__ import annotations

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops.dispatch import interpret_mode
from align_ti.ops.fused_kl.chunk_torch import ChunkSpec

_F32 = torch.float32
_autotuned = None


def _row_kernel():
    """(kernel, autotuned): the row kernel as launched, wrapped in triton.autotune over
    `heuristics.kl_row_autotune_configs()` with ALIGN_TI_AUTOTUNE=1."""
    from align_ti.kernels import fused_kl as _k

    if not _heur.autotune_enabled():
        return _k.fused_kl_rows_kernel, False
    global _autotuned
    if _autotuned is None:
        import triton

        _autotuned = triton.autotune(
            configs=_heur.kl_row_autotune_configs(),
            key=["n_cols_s", "v", "DIVERGENCE", "HAS_CE", "NEED_GRAD"],
            # the kernel writes the gradient over zs in place: every trial starts from the inputs
            restore_value=["zs_ptr", "zt_ptr", "g_ptr", "gce_ptr", "d_ptr", "nll_ptr"],
        )(_k.fused_kl_rows_kernel)
    return _autotuned, True


def chunk_triton(zs, zt, spec: ChunkSpec, labels=None, a=None, c=None, g_out=None):
    """`chunk_torch`'s contract; `g_out` (default: zs, in place) receives the gradient, in its
    own dtype."""
    r, ns = zs.shape
    device = zs.device
    has_ce = labels is not None
    need_grad = spec.need_grad
    d = torch.empty(r, dtype=_F32, device=device)
    nll = torch.empty(r, dtype=_F32, device=device) if has_ce else d
    g = zs if g_out is None else g_out
    split_ce = need_grad and has_ce and spec.split
    gce = torch.empty_like(zs) if split_ce else g
    # the kernel reads the per-row vectors at ptr + row: a stride-0 upstream gradient (of
    # reduction="none" then .sum()) or a strided labels / weights view must be made dense
    a_t = a.contiguous() if need_grad else d
    c_t = c.contiguous() if (need_grad and has_ce) else a_t
    lab = labels.contiguous() if has_ce else d
    if r > 0:
        kernel, tuned = _row_kernel()
        cfg = {} if tuned else _heur.kl_row_config(ns, interpret=interpret_mode())
        kernel[(r,)](
            zs, zs.stride(0), zt, zt.stride(0), g, g.stride(0), gce, gce.stride(0),
            lab, a_t, c_t, d, nll,
            ns, spec.v, float(spec.inv_t), float(spec.beta),
            DIVERGENCE=spec.div_code, HAS_CE=has_ce,
            CE_SHARES_LSE=bool(has_ce and spec.inv_t == 1.0 and ns == spec.v),
            SPLIT_CE=bool(has_ce and spec.split), NEED_GRAD=bool(need_grad),
            **cfg,
        )
    return d, (nll if has_ce else None), (g if need_grad else None), (gce if split_ce else None)
