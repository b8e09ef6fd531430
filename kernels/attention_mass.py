"""Triton device code for the attention-mass op (installed as align_ti.kernels.attention_mass).

Device code only: launchers, allocation and autograd live in align_ti/ops/attention_mass.py.

Common arguments:
- ``Q`` [B, Hq, L, D], ``K`` [B, Hkv, L, D] (any strides; head h uses key head h // (Hq // Hkv)).
- ``ORDER`` int64 [B, L] (contiguous): per sample, the selected query positions first, in
  ascending order; ``NSEL`` int32 [B]: how many. ``REAL`` int8 [B, L] (contiguous): 1 = real key.
- ``LSE`` fp32 [B, Hq, L] at *positions* (natural log); only entries at selected rows are
  read or written.
- ``qk_scale2`` = scale * log2(e): logits are kept in base 2 for exp2.
- ``DOT_PREC``: "ieee" for fp32 inputs (exact fp32 logits, no TF32), "tf32" (ignored) for
  16-bit inputs, whose q.k products accumulate in fp32 on the tensor cores. The backward's
  dS products run in fp32 ("ieee") whatever the input dtype.
Row-oriented programs (lse, dq) handle BLOCK_M compacted selected rows of one (b, h) and
exit at once when their block holds none. Key-oriented programs (mass, dk) handle BLOCK_N
keys and loop over the selected rows, so no atomics are needed and results are deterministic.
All address arithmetic is int64.
"""
import triton
import triton.language as tl

# Globals read inside @triton.jit code must be tl.constexpr: the compiler rejects plain
# Python floats (the interpreter does not; scripts/cuda_compile_check.py catches it).
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_rows(ORDER, NSEL, b, m0, L, BLOCK_M: tl.constexpr):
    """Compacted row indices m0 .. m0+BLOCK_M of sample b: (positions int64, valid mask)."""
    n = tl.load(NSEL + b).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rvalid = offs_m < n
    rpos = tl.load(ORDER + b * L + offs_m, mask=rvalid, other=0).to(tl.int64)
    return rpos, rvalid


@triton.jit
def _load_tile(PTR, base, pos, pvalid, stride_l, stride_d, D, BLOCK_D: tl.constexpr):
    """[len(pos), BLOCK_D] tile of rows `pos` (masked rows and columns read 0)."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    ptrs = PTR + base + pos[:, None] * stride_l + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=pvalid[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _scores(q, k, rpos, rvalid, kpos, kreal, qk_scale2, DOT_PREC: tl.constexpr):
    """log2-scaled scores of a row tile against a key tile, and which pairs count: not a later
    key (causal), not a padding key, not a row slot that holds no selected row."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2
    ok = (kpos[None, :] <= rpos[:, None]) & kreal[None, :] & rvalid[:, None]
    return s, ok


@triton.jit
def _probs(q, k, rpos, rvalid, kpos, kreal, lse2, qk_scale2, DOT_PREC: tl.constexpr):
    """The attention probabilities P of the tile (0 where the pair does not count)."""
    s, ok = _scores(q, k, rpos, rvalid, kpos, kreal, qk_scale2, DOT_PREC)
    return tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def attention_mass_lse_kernel(
    Q, K, ORDER, NSEL, REAL, LSE,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    slb, slh, sll,
    Hq, Hkv, L, D, qk_scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Pass 1: natural-log LSE of each selected row over its allowed keys."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // (Hq // Hkv)
    n = tl.load(NSEL + b).to(tl.int64)
    m0 = pid_m * BLOCK_M
    if m0 >= n:
        return
    rpos, rvalid = _load_rows(ORDER, NSEL, b, m0, L, BLOCK_M)
    q = _load_tile(Q, b * sqb + h * sqh, rpos, rvalid, sql, sqd, D, BLOCK_D)
    last = tl.max(tl.where(rvalid, rpos, 0), axis=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, last + 1, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        kin = kpos < L
        kreal = tl.load(REAL + b * L + kpos, mask=kin, other=0) != 0
        k = _load_tile(K, b * skb + kvh * skh, kpos, kin, skl, skd, D, BLOCK_D)
        s, ok = _scores(q, k, rpos, rvalid, kpos, kreal, qk_scale2, DOT_PREC)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * _LN2
    tl.store(LSE + b * slb + h * slh + rpos * sll, lse, mask=rvalid)


@triton.jit
def attention_mass_fwd_kernel(
    Q, K, ORDER, NSEL, REAL, LSE, MASS,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    slb, slh, sll,
    smb, smh, sml,
    Hq, Hkv, L, D, qk_scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Pass 2: MASS[b, h, j] = mean over selected rows i of exp(s_ij - lse_i)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // (Hq // Hkv)
    n = tl.load(NSEL + b).to(tl.int64)
    kpos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    kin = kpos < L
    acc = tl.zeros([BLOCK_N], tl.float32)
    last = tl.load(ORDER + b * L + tl.maximum(n - 1, 0)).to(tl.int64)
    if (n > 0) & (pid_n * BLOCK_N <= last):
        kreal = tl.load(REAL + b * L + kpos, mask=kin, other=0) != 0
        k = _load_tile(K, b * skb + kvh * skh, kpos, kin, skl, skd, D, BLOCK_D)
        for m0 in range(0, n, BLOCK_M):
            rpos, rvalid = _load_rows(ORDER, NSEL, b, m0, L, BLOCK_M)
            q = _load_tile(Q, b * sqb + h * sqh, rpos, rvalid, sql, sqd, D, BLOCK_D)
            lse2 = tl.load(LSE + b * slb + h * slh + rpos * sll, mask=rvalid, other=0.0) * _LOG2E
            p = _probs(q, k, rpos, rvalid, kpos, kreal, lse2, qk_scale2, DOT_PREC)
            acc += tl.sum(p, axis=0)
        acc = acc / n.to(tl.float32)
    tl.store(MASS + b * smb + h * smh + kpos * sml, acc, mask=kin)


@triton.jit
def _key_block(K, k_base, REAL_ROW, G, g_base, n0, q, rpos, rvalid, lse2, skl, skd, sgl, L, D,
               qk_scale2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of one (batch, head): their tile k, upstream gradient g and the
    probabilities P of the selected query rows against them."""
    kpos = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    kin = kpos < L
    kreal = tl.load(REAL_ROW + kpos, mask=kin, other=0) != 0
    k = _load_tile(K, k_base, kpos, kin, skl, skd, D, BLOCK_D)
    g = tl.load(G + g_base + kpos * sgl, mask=kin, other=0.0)
    p = _probs(q, k, rpos, rvalid, kpos, kreal, lse2, qk_scale2, DOT_PREC)
    return k, g, p


@triton.jit
def attention_mass_bwd_dq_kernel(
    Q, K, ORDER, NSEL, REAL, LSE, G, DELTA, DQ,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    slb, slh, sll,
    sgb, sgh, sgl,
    sdb, sdh, sdl,
    sdqb, sdqh, sdql, sdqd,
    Hq, Hkv, L, D, qk_scale2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """delta_i = sum_j P_ij G_j, then dq_i = scale * sum_j P_ij (G_j - delta_i) k_j.

    G [B, Hq, L] fp32 is the upstream gradient already divided by the selected count.
    DQ [B, Hq, L, D] fp32 must be zero-initialised (only selected rows are written).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // (Hq // Hkv)
    n = tl.load(NSEL + b).to(tl.int64)
    m0 = pid_m * BLOCK_M
    if m0 >= n:
        return
    rpos, rvalid = _load_rows(ORDER, NSEL, b, m0, L, BLOCK_M)
    q = _load_tile(Q, b * sqb + h * sqh, rpos, rvalid, sql, sqd, D, BLOCK_D)
    lse2 = tl.load(LSE + b * slb + h * slh + rpos * sll, mask=rvalid, other=0.0) * _LOG2E
    last = tl.max(tl.where(rvalid, rpos, 0), axis=0)
    k_base = b * skb + kvh * skh
    g_base = b * sgb + h * sgh
    delta = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, last + 1, BLOCK_N):
        k, g, p = _key_block(K, k_base, REAL + b * L, G, g_base, n0, q, rpos, rvalid, lse2, skl, skd,
                             sgl, L, D, qk_scale2, BLOCK_N, BLOCK_D, DOT_PREC)
        delta += tl.sum(p * g[None, :], axis=1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, last + 1, BLOCK_N):  # the same key blocks again, now that delta is known
        k, g, p = _key_block(K, k_base, REAL + b * L, G, g_base, n0, q, rpos, rvalid, lse2, skl, skd,
                             sgl, L, D, qk_scale2, BLOCK_N, BLOCK_D, DOT_PREC)
        ds = p * (g[None, :] - delta[:, None])
        dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee")
    dq = dq * scale
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    tl.store(DQ + b * sdqb + h * sdqh + rpos[:, None] * sdql + offs_d[None, :] * sdqd, dq,
             mask=rvalid[:, None] & (offs_d[None, :] < D))
    tl.store(DELTA + b * sdb + h * sdh + rpos * sdl, delta, mask=rvalid)


@triton.jit
def attention_mass_bwd_dk_kernel(
    Q, K, ORDER, NSEL, REAL, LSE, G, DELTA, DK,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    slb, slh, sll,
    sgb, sgh, sgl,
    sdb, sdh, sdl,
    sdkb, sdkh, sdkl, sdkd,
    Hq, Hkv, L, D, qk_scale2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk_j = scale * sum over the group's heads and selected rows of P_ij (G_j - delta_i) q_i."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bkv = tl.program_id(1).to(tl.int64)
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv
    group = Hq // Hkv
    n = tl.load(NSEL + b).to(tl.int64)
    kpos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    kin = kpos < L
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    last = tl.load(ORDER + b * L + tl.maximum(n - 1, 0)).to(tl.int64)
    if (n > 0) & (pid_n * BLOCK_N <= last):
        kreal = tl.load(REAL + b * L + kpos, mask=kin, other=0) != 0
        k = _load_tile(K, b * skb + kvh * skh, kpos, kin, skl, skd, D, BLOCK_D)
        for gi in range(0, group):
            h = kvh * group + gi
            g = tl.load(G + b * sgb + h * sgh + kpos * sgl, mask=kin, other=0.0)
            for m0 in range(0, n, BLOCK_M):
                rpos, rvalid = _load_rows(ORDER, NSEL, b, m0, L, BLOCK_M)
                q = _load_tile(Q, b * sqb + h * sqh, rpos, rvalid, sql, sqd, D, BLOCK_D)
                lse2 = tl.load(LSE + b * slb + h * slh + rpos * sll, mask=rvalid, other=0.0) * _LOG2E
                dlt = tl.load(DELTA + b * sdb + h * sdh + rpos * sdl, mask=rvalid, other=0.0)
                p = _probs(q, k, rpos, rvalid, kpos, kreal, lse2, qk_scale2, DOT_PREC)
                ds = p * (g[None, :] - dlt[:, None])
                dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee")
        dk = dk * scale
    tl.store(DK + b * sdkb + kvh * sdkh + kpos[:, None] * sdkl + offs_d[None, :] * sdkd, dk,
             mask=kin[:, None] & (offs_d[None, :] < D))
