"""topk_align's Triton driver (impl="triton"): the row gather fused into its own matmul kernels
(kernels/topk_align.py; CUDA, or CPU under TRITON_INTERPRET=1).

Per row chunk, the logits of both heads come from `topk_align_gather_logits_kernel`, which loads
the selected hidden rows through the index vector (no [rows, H] copy of the hidden states, for
either model); the per-row divergence and its gradient with respect to the student logits come
from the fused KL's row kernel, in place over the chunk's logits; the student hidden-state
gradient of the chunk (a dense g @ W_S matmul) is scattered into the [B*L, Hs] gradient by
`topk_align_scatter_rows_kernel` (distinct rows: one writer per row, no atomics), and the weight
gradient ``g^T h[rows]`` comes from `topk_align_gather_dw_kernel` (rows gathered through the
index vector, one program per output tile: deterministic). The gradients are computed in the
forward, for the scalar loss. On an H100 (B=8, L=1024, 729 vision tokens, Hs=896, Ht=3584,
V=151936 bf16; benchmarks/results/h100/topk_align-quick.md) this took 41.7 ms against 28.0 ms
for fused_linear_kl on the same rows: cuBLAS beats these matmuls by far more than the [r, H]
copies cost, so impl="auto" does not use it.
"""
from __future__ import annotations

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops.dispatch import cdiv, interpret_mode
from align_ti.ops.fused_kl.chunk_torch import ChunkSpec
from align_ti.ops.fused_kl.chunk_triton import chunk_triton
from align_ti.ops.fused_kl.driver import GradRequest, Head
from align_ti.ops.fused_kl.matmuls import StudentGrads
from align_ti.ops.fused_kl.options import FusedKLOptions
from align_ti.ops.fused_kl.rows import weigh_rows

_F32 = torch.float32
_autotuned: dict = {}


def _ieee(t: torch.Tensor) -> bool:
    """fp32 matmuls in full precision unless torch allows tf32 (as torch.mm does)."""
    return t.dtype == _F32 and not (t.is_cuda and bool(torch.backends.cuda.matmul.allow_tf32))


def _kernel(name: str, kind: str, **autotune):
    """(kernel, tuned): the kernel `name` of align_ti.kernels.topk_align, wrapped with
    ALIGN_TI_AUTOTUNE=1 in triton.autotune over `heuristics.topk_align_autotune_configs(kind)`."""
    from align_ti.kernels import topk_align as _k

    fn = getattr(_k, name)
    if not _heur.autotune_enabled():
        return fn, False
    if name not in _autotuned:
        import triton

        _autotuned[name] = triton.autotune(configs=_heur.topk_align_autotune_configs(kind),
                                           **autotune)(fn)
    return _autotuned[name], True


def _launch_logits(h, idx, weight, bias, ncols, out):
    """out (fp32 [r, ncols]) <- h[idx] @ weight[:ncols]^T + bias[:ncols]."""
    r = idx.shape[0]
    kernel, tuned = _kernel("topk_align_gather_logits_kernel", "logits", key=["r", "ncols", "H"])
    cfg = {} if tuned else _heur.topk_align_gemm_config("logits", h.dtype, interpret_mode())

    def grid(meta):
        return (cdiv(r, meta["BLOCK_M"]) * cdiv(ncols, meta["BLOCK_N"]),)

    kernel[grid](
        h, h.stride(0), h.stride(1), idx, weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else out, out, out.stride(0), r, ncols, h.shape[1],
        HAS_BIAS=bias is not None, IEEE=_ieee(h), **cfg,
    )


def _launch_dw(g, h, idx, dw, db, ncols, accumulate):
    """dw[:ncols] (+)= g^T h[idx]; db[:ncols] (+)= g.sum(0) when db is given."""
    r = idx.shape[0]
    # with ACCUMULATE the kernel adds into dw and db: every trial starts from their values
    kernel, tuned = _kernel("topk_align_gather_dw_kernel", "dw", key=["r", "ncols", "H"],
                            restore_value=["dw_ptr", "db_ptr"])
    cfg = {} if tuned else _heur.topk_align_gemm_config("dw", h.dtype, interpret_mode())

    def grid(meta):
        return (cdiv(ncols, meta["BLOCK_N"]), cdiv(h.shape[1], meta["BLOCK_K"]))

    kernel[grid](
        g, g.stride(0), h, h.stride(0), h.stride(1), idx, dw, dw.stride(0),
        db if db is not None else dw, r, ncols, h.shape[1],
        ACCUMULATE=bool(accumulate), HAS_DB=db is not None, IEEE=_ieee(h), **cfg,
    )


def _launch_scatter(src, idx, dst):
    """dst[idx] = src (cast to dst's dtype)."""
    kernel, tuned = _kernel("topk_align_scatter_rows_kernel", "scatter", key=["H"])
    cfg = {} if tuned else _heur.topk_align_scatter_config(dst.shape[1])
    kernel[(idx.shape[0],)](src, src.stride(0), idx, dst, dst.stride(0), dst.shape[1], **cfg)


def _grad_hidden(g, weight):
    """fp32 [r, H] = g @ weight (g fp32 [r, ncols]); bf16/fp16 weights as fused_kl does."""
    if weight.dtype == _F32:
        return g @ weight
    if weight.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(g.to(weight.dtype), weight, out_dtype=_F32)
    return g @ weight.to(_F32)


def gather_driver(student: Head, teacher: Head, rows, coef, opts: FusedKLOptions,
                  want: GradRequest):
    """(loss = sum_i coef_i D_i over the selected rows, StudentGrads for a unit upstream
    gradient): dh in the hidden states' dtype [N, Hs]; dw fp32 or (fp32_weight_grad=False) in
    the weight's dtype; db fp32; each only where `want` asks for it."""
    hs, ws, bs = student
    ht, wt, bt = teacher
    device = hs.device
    m = rows.shape[0]
    v = opts.vocab_size
    need_db = want.db and bs is not None
    need_grad = want.dh or want.dw or need_db
    spec = ChunkSpec(v, opts.kl.code, opts.kl.beta, 1.0 / opts.kl.temperature, need_grad)
    r_chunk = _heur.rows_per_chunk(4 * 2 * v, device, opts.chunk_bytes or None)
    r_chunk = _heur.balanced_rows(m, r_chunk, device)
    buf_s = torch.empty(r_chunk, v, dtype=_F32, device=device)
    buf_t = torch.empty(r_chunk, v, dtype=_F32, device=device)
    d_all = torch.zeros(m, dtype=_F32, device=device)
    dh = torch.zeros(hs.shape, dtype=hs.dtype, device=device) if want.dh else None
    dw_dtype = _F32 if want.fp32_weight_grad else ws.dtype  # the kernel rounds at its store
    dw = torch.zeros(ws.shape, dtype=dw_dtype, device=device) if want.dw else None
    db = torch.zeros(bs.shape, dtype=_F32, device=device) if need_db else None
    for s in range(0, m, r_chunk):
        e = min(s + r_chunk, m)
        idx = rows[s:e]
        zs, zt = buf_s[: e - s], buf_t[: e - s]
        _launch_logits(hs, idx, ws, bs, v, zs)
        _launch_logits(ht, idx, wt, bt, v, zt)
        # the gradient with respect to the raw student logits, in place over zs
        d_all[s:e], _, g, _ = chunk_triton(zs, zt, spec, a=coef[s:e] if need_grad else None)
        if not need_grad:
            continue
        if want.dh:
            _launch_scatter(_grad_hidden(g, ws[:v]), idx, dh)
        if want.dw:
            _launch_dw(g, hs, idx, dw, db, v, accumulate=s > 0)
        elif need_db:
            db[:v] += g.sum(0)
    loss = weigh_rows(d_all, coef).sum()  # a row of weight 0 adds 0, even with D = +inf
    return loss, StudentGrads(dh, dw, db)
