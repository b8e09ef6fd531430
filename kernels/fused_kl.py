"""Triton device code for the fused vocabulary divergence (installed as align_ti.kernels.fused_kl).

Device code only: no autograd, no allocation, no torch glue (see align_ti/ops/fused_kl.py).

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
"""
import triton
import triton.language as tl


@triton.jit
def _logaddexp(x, y):
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    return mx + tl.log(1.0 + tl.exp(mn - mx))


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
    # forward: acc = sum e^(ut-m_t) ((ut-m_t) - (us-m_s)); reverse: the same with s and t
    # swapped. Shifted by the running maxima, its terms are of the size of the log-probs,
    # not of the logits: sum p_t (ut - us) - lse_t + lse_s cancels terms of the logits' size
    # (a KL of 1e-4 lost 20% at logits of std 100). A max update shifts every earlier
    # difference by delta, hence the `acc - delta * sum` before the rescale.
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
        al_s = tl.exp(m_s - mn_s)
        al_t = tl.exp(m_t - mn_t)
        e_s = tl.exp(us - mn_s)
        e_t = tl.exp(ut - mn_t)
        if DIVERGENCE < 2:
            # before the first term the maxima are -inf: no shift (and no inf - inf)
            started = (s_t > 0) if DIVERGENCE == 0 else (s_s > 0)
            pm_s = tl.where(started, m_s, mn_s)
            pm_t = tl.where(started, m_t, mn_t)
        if DIVERGENCE == 0:
            delta = (mn_t - pm_t) - (mn_s - pm_s)
            acc = (acc - delta * s_t) * al_t + tl.sum(
                tl.where(in_v, e_t * ((ut - mn_t) - (us - mn_s)), 0.0), 0)
        if DIVERGENCE == 1:
            delta = (mn_s - pm_s) - (mn_t - pm_t)
            acc = (acc - delta * s_s) * al_s + tl.sum(
                tl.where(in_v, e_s * ((us - mn_s) - (ut - mn_t)), 0.0), 0)
        s_s = s_s * al_s + tl.sum(e_s, 0)
        s_t = s_t * al_t + tl.sum(e_t, 0)
        m_s = mn_s
        m_t = mn_t
        if HAS_CE:
            if not CE_SHARES_LSE:
                mn_r = tl.maximum(m_r, tl.max(zs, 0))
                s_r = s_r * tl.exp(m_r - mn_r) + tl.sum(tl.exp(zs - mn_r), 0)
                m_r = mn_r
    lse_s = m_s + tl.log(s_s)
    lse_t = m_t + tl.log(s_t)

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
            lm = _logaddexp(log_b + lt, log_1mb + ls)
            dt += tl.sum(tl.where(in_v, tl.exp(lt) * (lt - lm), 0.0), 0)
            kls += tl.sum(tl.where(in_v, tl.exp(ls) * (ls - lm), 0.0), 0)
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
            lse_r = m_r + tl.log(s_r)
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
                gk = ps * (ls - lt - d)
            else:
                lm = _logaddexp(log_b2 + lt, log_1mb2 + ls)
                gk = (1.0 - beta) * ps * (ls - lm - kls)
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
