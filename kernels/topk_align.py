"""Triton device code for the top-k visual-token alignment (installed as align_ti.kernels.topk_align).

Device code only: no autograd, no allocation, no torch glue (see align_ti/ops/topk_align/gather.py).
The per-row divergence and its gradient reuse `align_ti.kernels.fused_kl.fused_kl_rows_kernel`;
the kernels here are the two matmuls whose operands are *gathered* rows of the flattened hidden
states, so that no [rows, H] copy of the selected hidden states is ever made:

- `topk_align_gather_logits_kernel`: ``out[i, n] = sum_k h[rows[i], k] * W[n, k] (+ bias[n])``
  for the chunk's rows i and columns n < ncols, fp32 accumulator and fp32 output (the logits of the
  fused KL; never rounded to bf16/fp16). The hidden rows are loaded through the index vector.
  Programs are ordered row-tile fastest, so one W tile is read once from HBM and reused from L2
  by every row tile of the chunk (the selected hidden rows are small and stay in L2).
- `topk_align_gather_dw_kernel`: ``dw[n, k] (+)= sum_i g[i, n] * h[rows[i], k]``: the student
  head's weight gradient with the K dimension (the chunk's rows) gathered through the index vector.
  One program per output tile, rows reduced in a fixed order: deterministic, no atomics.
- `topk_align_scatter_rows_kernel`: ``dst[rows[i], :] = src[i, :]`` (cast to dst's dtype): the
  hidden-state gradient of the chunk's rows written into the [B*L, H] gradient. The selected rows are
  distinct, so every destination row has one writer: deterministic, no atomics.

All address arithmetic is int64.
"""
import triton
import triton.language as tl


@triton.jit
def topk_align_gather_logits_kernel(
    h_ptr, h_stride0, h_stride1,      # [N, H] hidden states (all rows; read through rows_ptr)
    rows_ptr,                         # int64 [r] row indices of this chunk into N
    w_ptr, w_stride0, w_stride1,      # [V, H] head weight (same dtype as h)
    b_ptr,                            # [V] bias (HAS_BIAS)
    out_ptr, out_stride,              # fp32 [r, >= ncols] out
    r, ncols, H,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,               # fp32 inputs without tf32 (torch's allow_tf32 off)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(r, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < r
    in_n = offs_n < ncols
    idx = tl.load(rows_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < H
        a = tl.load(
            h_ptr + idx[:, None] * h_stride0 + offs_k[None, :].to(tl.int64) * h_stride1,
            mask=in_m[:, None] & in_k[None, :], other=0.0,
        )
        b = tl.load(
            w_ptr + offs_n[None, :] * w_stride0 + offs_k[:, None].to(tl.int64) * w_stride1,
            mask=in_n[None, :] & in_k[:, None], other=0.0,
        )
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(out_ptr + offs_m[:, None] * out_stride + offs_n[None, :], acc,
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def topk_align_gather_dw_kernel(
    g_ptr, g_stride,                  # fp32 [r, >= ncols] gradient w.r.t. the student logits
    h_ptr, h_stride0, h_stride1,      # [N, H] student hidden states (read through rows_ptr)
    rows_ptr,                         # int64 [r]
    dw_ptr, dw_stride,                # [>= ncols, H] accumulator, fp32 or the weight dtype
    db_ptr,                           # fp32 [>= ncols] bias-gradient accumulator (HAS_DB)
    r, ncols, H,
    ACCUMULATE: tl.constexpr,         # add to dw/db (False: overwrite, the first chunk)
    HAS_DB: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_n = offs_n < ncols
    in_k = offs_k < H
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    gsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < r
        idx = tl.load(rows_ptr + offs_r, mask=in_r, other=0).to(tl.int64)
        gt = tl.load(g_ptr + offs_r[None, :].to(tl.int64) * g_stride + offs_n[:, None],
                     mask=in_n[:, None] & in_r[None, :], other=0.0)          # [BLOCK_N, BLOCK_R]
        hh = tl.load(h_ptr + idx[:, None] * h_stride0 + offs_k[None, :] * h_stride1,
                     mask=in_r[:, None] & in_k[None, :], other=0.0)          # [BLOCK_R, BLOCK_K]
        if HAS_DB:
            gsum += tl.sum(gt, 1)
        if IEEE:
            acc = tl.dot(gt.to(hh.dtype), hh, acc, input_precision="ieee")
        else:
            acc = tl.dot(gt.to(hh.dtype), hh, acc)
    dw_ptrs = dw_ptr + offs_n[:, None] * dw_stride + offs_k[None, :]
    out_mask = in_n[:, None] & in_k[None, :]
    if ACCUMULATE:
        acc += tl.load(dw_ptrs, mask=out_mask, other=0.0)
    tl.store(dw_ptrs, acc, mask=out_mask)
    if HAS_DB:
        if pid_k == 0:
            if ACCUMULATE:
                gsum += tl.load(db_ptr + offs_n, mask=in_n, other=0.0)
            tl.store(db_ptr + offs_n, gsum, mask=in_n)


@triton.jit
def topk_align_scatter_rows_kernel(
    src_ptr, src_stride,              # [r, >= H] rows to write (any float dtype)
    rows_ptr,                         # int64 [r] destination rows (distinct)
    dst_ptr, dst_stride,              # [N, >= H] destination
    H,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    dst_row = tl.load(rows_ptr + i).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        x = tl.load(src_ptr + i * src_stride + offs, mask=m, other=0.0)
        tl.store(dst_ptr + dst_row * dst_stride + offs, x.to(dst_ptr.dtype.element_ty), mask=m)
