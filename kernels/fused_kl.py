"""Triton device code for the fused vocabulary divergence (installed as align_ti.kernels.fused_kl).

Device code only: no autograd, no allocation, no torch glue (launched by
align_ti/ops/fused_kl/chunk_triton.py).

`fused_kl_rows_kernel` handles one row per program. It reads the row's fp32 student logits
(raw, [n_cols_s] wide: V' for the divergence, all Vs when the row also carries CE) and raw
teacher logits ([v] wide), streams the vocabulary in BLOCK_V-wide blocks with an online
log-sum-exp, and writes
- d[row]:   the divergence D (forward / reverse / jsd) of the temperature-scaled softmaxes
            over the first v entries,
- nll[row]: the cross-entropy of the raw student logits over all n_cols_s entries (HAS_CE),
- g[row]:   when NEED_GRAD, a * dD/dz + c * dCE/dz with respect to the raw student logits
            (dCE/dz into gce instead when SPLIT_CE). g may alias zs (in place): every block
            is read before it is written, and no other program touches the row.
Passes over the row: 1 (statistics, plus D for forward/reverse via online accumulators),
+1 for jsd (its D needs both normalisers first), +1 for the gradient.
All address arithmetic is int64 (row * stride can exceed 2^31 for [rows, 151936] chunks).
-inf logits are vocabulary masks with 0 log 0 = 0 (the rule of align_ti/reference/fused_kl.py):
each product p (log p - log q) takes its difference only where p > 0, the online log-sum-exps
shift by 0 while every column so far is masked (`_shift`), never by -inf, and a block of
masked columns adds 0 to every sum.
"""
import triton
import triton.language as tl


@triton.jit
def _logaddexp(x, y):
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    return mx + tl.log(1.0 + tl.exp(mn - mx))


@triton.jit
def _shift(m):
    """The shift of an online log-sum-exp whose running max is m: m, or 0 while m is -inf
    (every column so far masked), so that no -inf - -inf = NaN appears."""
    return tl.where(m > float("-inf"), m, 0.0)


@triton.jit
def _rescale(m_old, m_new):
    """The factor exp(m_old - m_new) of an online sum when its max grows, and 0 while m_old
    is -inf (the sum is 0 then, and exp(-inf - -inf) would be NaN)."""
    return tl.where(m_old > float("-inf"), tl.exp(m_old - m_new), 0.0)


@triton.jit
def _p_log_ratio(p, lp, lq):
    """p (lp - lq) with 0 log 0 = 0: 0 where p == 0 whatever lq is; +inf where p > 0 and
    lq = -inf; NaN where p is NaN."""
    return p * tl.where(p > 0.0, lp - lq, 0.0)


@triton.jit
def fused_kl_rows_kernel(
    zs_ptr, zs_stride,          # fp32/bf16/fp16 [R, >= n_cols_s] raw student logits
    zt_ptr, zt_stride,          # [R, >= v] raw teacher logits
    g_ptr, g_stride,            # [R, >= n_cols_s] gradient out (may alias zs)
    gce_ptr, gce_stride,        # [R, >= n_cols_s] CE gradient out (SPLIT_CE only)
    labels_ptr,                 # int64 [R] (HAS_CE), -100 = no CE for the row
    a_ptr,                      # fp32 [R] coefficient of dD/dz (NEED_GRAD)
    c_ptr,                      # fp32 [R] coefficient of dCE/dz (NEED_GRAD and HAS_CE)
    d_ptr,                      # fp32 [R] out: divergence per row
    nll_ptr,                    # fp32 [R] out: CE per row (0 where label == -100)
    n_cols_s,                   # student columns read (V' or Vs)
    v,                          # V': columns of the divergence
    inv_t,                      # 1 / temperature
    beta,                       # jsd weight
    DIVERGENCE: tl.constexpr,   # 0 forward KL(pT||pS), 1 reverse KL(pS||pT), 2 jsd
    HAS_CE: tl.constexpr,
    CE_SHARES_LSE: tl.constexpr,  # inv_t == 1 and n_cols_s == v: CE reuses the student LSE
    SPLIT_CE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride
    cols = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    # ---- pass 1: online log-sum-exp of both scaled heads (+ raw student for CE) ---------
    m_s = tl.full([], NEG_INF, tl.float32)
    s_s = tl.zeros([], tl.float32)
    m_t = tl.full([], NEG_INF, tl.float32)
    s_t = tl.zeros([], tl.float32)
    m_r = tl.full([], NEG_INF, tl.float32)
    s_r = tl.zeros([], tl.float32)
    # forward: acc = sum e^(ut-k_t) ((ut-k_t) - (us-k_s)), k = `_shift` of the running maxima;
    # reverse: the same with s and t swapped. Shifted, its terms are of the size of the
    # log-probs, not of the logits: sum p_t (ut - us) - lse_t + lse_s cancels terms of the
    # logits' size (a KL of 1e-4 lost 20% at logits of std 100). A shift update moves every
    # earlier difference by delta, hence the `acc - delta * sum` before the rescale; an acc
    # that is already +inf (p > 0 == q) stays so (the rescale may underflow to 0).
    acc = tl.zeros([], tl.float32)
    for start in range(0, n_cols_s, BLOCK_V):
        offs = start + cols
        in_s = offs < n_cols_s
        in_v = offs < v
        zs = tl.load(zs_row + offs, mask=in_s, other=NEG_INF).to(tl.float32)
        zt = tl.load(zt_row + offs, mask=in_v, other=NEG_INF).to(tl.float32)
        us = tl.where(in_v, zs * inv_t, NEG_INF)
        ut = zt * inv_t
        mn_s = tl.maximum(m_s, tl.max(us, 0))
        mn_t = tl.maximum(m_t, tl.max(ut, 0))
        k_s = _shift(mn_s)
        k_t = _shift(mn_t)
        al_s = _rescale(m_s, mn_s)
        al_t = _rescale(m_t, mn_t)
        e_s = tl.exp(us - k_s)
        e_t = tl.exp(ut - k_t)
        if DIVERGENCE == 0:
            delta = (k_t - _shift(m_t)) - (k_s - _shift(m_s))
            acc_new = (acc - delta * s_t) * al_t + tl.sum(
                tl.where(in_v, _p_log_ratio(e_t, ut - k_t, us - k_s), 0.0), 0)
            acc = tl.where(acc == float("inf"), acc, acc_new)
        if DIVERGENCE == 1:
            delta = (k_s - _shift(m_s)) - (k_t - _shift(m_t))
            acc_new = (acc - delta * s_s) * al_s + tl.sum(
                tl.where(in_v, _p_log_ratio(e_s, us - k_s, ut - k_t), 0.0), 0)
            acc = tl.where(acc == float("inf"), acc, acc_new)
        s_s = s_s * al_s + tl.sum(e_s, 0)
        s_t = s_t * al_t + tl.sum(e_t, 0)
        m_s = mn_s
        m_t = mn_t
        if HAS_CE:
            if not CE_SHARES_LSE:
                mn_r = tl.maximum(m_r, tl.max(zs, 0))
                s_r = s_r * _rescale(m_r, mn_r) + tl.sum(tl.exp(zs - _shift(mn_r)), 0)
                m_r = mn_r
    lse_s = _shift(m_s) + tl.log(s_s)
    lse_t = _shift(m_t) + tl.log(s_t)

    kls = tl.zeros([], tl.float32)
    if DIVERGENCE == 0:
        d = acc / s_t - tl.log(s_t) + tl.log(s_s)
    elif DIVERGENCE == 1:
        d = acc / s_s - tl.log(s_s) + tl.log(s_t)
    else:
        # ---- pass 2 (jsd): D = b KL(pT||M) + (1-b) KL(pS||M) -----------------------------
        log_b = tl.log(beta)
        log_1mb = tl.log(1.0 - beta)
        dt = tl.zeros([], tl.float32)
        for start in range(0, v, BLOCK_V):
            offs = start + cols
            in_v = offs < v
            zs = tl.load(zs_row + offs, mask=in_v, other=0.0).to(tl.float32)
            zt = tl.load(zt_row + offs, mask=in_v, other=0.0).to(tl.float32)
            ls = zs * inv_t - lse_s
            lt = zt * inv_t - lse_t
            lm = _logaddexp(log_b + lt, log_1mb + ls)  # NaN where both are masked: unused
            dt += tl.sum(tl.where(in_v, _p_log_ratio(tl.exp(lt), lt, lm), 0.0), 0)
            kls += tl.sum(tl.where(in_v, _p_log_ratio(tl.exp(ls), ls, lm), 0.0), 0)
        d = beta * dt + (1.0 - beta) * kls
    tl.store(d_ptr + row, d)

    if HAS_CE:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != -100
        safe = tl.where(valid, label, 0)
        z_label = tl.load(zs_row + safe).to(tl.float32)
        if CE_SHARES_LSE:
            lse_r = lse_s
        else:
            lse_r = _shift(m_r) + tl.log(s_r)
        tl.store(nll_ptr + row, tl.where(valid, lse_r - z_label, 0.0))

    # ---- pass 3: gradient with respect to the raw student logits -------------------------
    if NEED_GRAD:
        a = tl.load(a_ptr + row)
        ka = a * inv_t
        if HAS_CE:
            c = tl.load(c_ptr + row)
            c = tl.where(valid, c, 0.0)
        g_row = g_ptr + row * g_stride
        gce_row = gce_ptr + row * gce_stride
        if DIVERGENCE == 1:
            # the +inf parts (columns only the teacher masks, and D then) count as 0: a finite
            # gradient for every row, so a row of weight 0 gets exactly 0 (as the torch path)
            d_g = tl.where(d == float("inf"), 0.0, d)
        if DIVERGENCE == 2:
            log_b2 = tl.log(beta)
            log_1mb2 = tl.log(1.0 - beta)
        for start in range(0, n_cols_s, BLOCK_V):
            offs = start + cols
            in_s = offs < n_cols_s
            in_v = offs < v
            zs = tl.load(zs_row + offs, mask=in_s, other=0.0).to(tl.float32)
            zt = tl.load(zt_row + offs, mask=in_v, other=0.0).to(tl.float32)
            ls = zs * inv_t - lse_s
            lt = zt * inv_t - lse_t
            ps = tl.exp(ls)
            if DIVERGENCE == 0:
                gk = ps - tl.exp(lt)
            elif DIVERGENCE == 1:
                diff = tl.where(lt > float("-inf"), ls - lt, 0.0)
                gk = ps * (tl.where(ps > 0.0, diff, 0.0) - d_g)
            else:
                lm = _logaddexp(log_b2 + lt, log_1mb2 + ls)
                gk = (1.0 - beta) * ps * (tl.where(ps > 0.0, ls - lm, 0.0) - kls)
            # a == 0 (unselected or zero-weight row) gives exactly 0, never 0 * NaN
            gk = tl.where(in_v, gk * ka, 0.0)
            gk = tl.where(ka != 0.0, gk, 0.0)
            if HAS_CE:
                pr = tl.exp(zs - lse_r)
                gc = pr - tl.where(offs == safe, 1.0, 0.0)
                gc = tl.where(c != 0.0, gc * c, 0.0)
                if SPLIT_CE:
                    tl.store(g_row + offs, gk.to(g_ptr.dtype.element_ty), mask=in_s)
                    tl.store(gce_row + offs, gc.to(gce_ptr.dtype.element_ty), mask=in_s)
                else:
                    tl.store(g_row + offs, (gk + gc).to(g_ptr.dtype.element_ty), mask=in_s)
            else:
                tl.store(g_row + offs, gk.to(g_ptr.dtype.element_ty), mask=in_s)
