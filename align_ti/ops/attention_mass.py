"""Instruction->vision attention mass from a layer's post-RoPE queries and keys.

``attention_mass`` replaces "eager attention with output_attentions=True" for reading one
layer's instruction->vision attention (IRS / IVA, METHOD.md): it works only on the selected
query rows and never holds ``[B, H, L, L]``.

Two implementations behind one ``torch.library`` op, ``align_ti::attention_mass`` (with fake
tensor support, so ``torch.compile`` traces through it), and its backward op:

- ``impl="triton"`` (the default on CUDA): kernels in ``align_ti.kernels.attention_mass``.
  Selected rows are compacted per sample on the device (a stable argsort, no host sync);
  programs whose row block holds no selected row exit at once, so the work scales with the
  number of selected queries. Forward: pass 1 computes the row log-sum-exp (skipped when an
  ``lse`` is supplied), pass 2 (one program per key block, looping over the selected rows)
  sums the probabilities: deterministic, no atomics.
- ``impl="torch"`` (the default elsewhere): the same two passes in chunks of
  ``rows x keys`` whose fp32 logits stay under ``AttentionMassOptions.chunk_bytes``. It sizes
  its row gather with one host read of the selected-row count (free on CPU).

Backward (both): with ``G[h, j] = dmass[h, j] / n_selected`` and ``P`` the row softmax,
``delta_i = sum_j P_ij G_j``, ``dS_ij = P_ij (G_j - delta_i)``, ``dq_i = scale sum_j dS_ij k_j``,
``dk_j = scale sum_{h in group, i} dS_ij q_i``. This is the gradient of the true softmax also
when ``lse`` is supplied (the ``lse`` is only a cached forward value and gets no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops._autograd import (
    refuse_double_backward,
    save_inputs,
    saved_inputs,
    without_autocast,
)
from align_ti.ops.dispatch import cdiv, interpret_mode
from align_ti.ops.heuristics import (
    ATTENTION_MASS_CHUNK_BYTES,
    attention_mass_config,
    resolve_chunk_bytes,
)
from align_ti.validation import (
    check_bool,
    check_choice,
    check_dim,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
    describe,
    value_checks_enabled,
)

__all__ = ["attention_mass", "check_attention_mass_args"]


@dataclass(frozen=True)
class AttentionMassOptions:
    """Non-tensor options of one ``attention_mass`` call.

    scale: softmax scale (already resolved; > 0).
    impl: "triton" or "torch" (resolved from "auto").
    chunk_bytes: torch path: upper bound on the bytes of one fp32 logits chunk.
    block_m, block_n: Triton tile sizes (None = ``heuristics.attention_mass_config``).
    """

    scale: float
    impl: str = "torch"
    chunk_bytes: int = ATTENTION_MASS_CHUNK_BYTES
    block_m: int | None = None
    block_n: int | None = None


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------


def _check_binary_mask(name: str, mask: torch.Tensor) -> None:
    """A content check: an integer mask holds only 0 and 1."""
    if mask.dtype == torch.bool or mask.numel() == 0 or not value_checks_enabled():
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold only 0 and 1 (1 = real token), got values "
            f"{torch.unique(mask[bad])[:5].tolist()} ({describe(mask)})"
        )


def check_attention_mass_args(q, k, query_mask, attention_mask=None, scale=None, average_heads=True) -> float:
    """The argument checks of ``attention_mass``: TypeError / ValueError naming the argument;
    returns the resolved scale (``D ** -0.5`` when ``scale`` is None)."""
    check_tensor("q", q, ndim=4, dtypes=_FLOATS)
    check_tensor("k", k, ndim=4, dtypes=_FLOATS)
    check_same_dtype("k", k, "q", q)
    B, Hq, L, D = q.shape
    if D == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {list(q.shape)}")
    check_dim("k", k, 0, B, "the batch size of q")
    check_dim("k", k, 2, L, "the sequence length of q")
    check_dim("k", k, 3, D, "the head dim of q")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key heads: "
            f"q has Hq = {Hq} heads (shape {list(q.shape)}), k has Hkv = {Hkv} "
            f"(shape {list(k.shape)})"
        )
    check_tensor("query_mask", query_mask, ndim=2, dtypes=(torch.bool,))
    check_dim("query_mask", query_mask, 0, B, "the batch size of q")
    check_dim("query_mask", query_mask, 1, L, "the sequence length of q")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, dtypes=_MASK_DTYPES)
        check_dim("attention_mask", attention_mask, 0, B, "the batch size of q")
        check_dim("attention_mask", attention_mask, 1, L, "the sequence length of q")
    check_same_device({"q": q, "k": k, "query_mask": query_mask, "attention_mask": attention_mask})
    if attention_mask is not None:
        _check_binary_mask("attention_mask", attention_mask)
    if scale is None:
        scale = D**-0.5
    else:
        check_positive("scale", scale)
    check_bool("average_heads", average_heads)
    return float(scale)


def _check_lse(lse, q):
    if lse is None:
        return
    check_tensor("lse", lse, ndim=3, dtypes=_FLOATS)
    B, Hq, L, _ = q.shape
    check_dim("lse", lse, 0, B, "the batch size of q")
    check_dim("lse", lse, 1, Hq, "the number of query heads of q")
    check_dim("lse", lse, 2, L, "the sequence length of q")
    check_same_device({"q": q, "lse": lse})


# --------------------------------------------------------------------------------------
# Row compaction (shared by both paths)
# --------------------------------------------------------------------------------------


def _compact_rows(selected: torch.Tensor):
    """Per sample, the selected positions first, in order.

    Returns ``order`` int64 [B, L] (a permutation per row; entries ``< n_sel[b]`` are the
    selected positions, ascending) and ``n_sel`` int64 [B]. No host sync.
    """
    key = (~selected).to(torch.int8)
    order = torch.argsort(key, dim=1, stable=True)
    n_sel = selected.sum(dim=1)
    return order, n_sel


# --------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------


class _TorchPlan:
    """Gathered selected rows and chunk sizes for the torch path."""

    def __init__(self, q, k, selected, real, opts: AttentionMassOptions):
        B, Hq, L, D = q.shape
        Hkv = k.shape[1]
        self.B, self.Hq, self.Hkv, self.L, self.D = B, Hq, Hkv, L, D
        self.G = Hq // Hkv
        self.cdt = _compute_dtype(q.dtype)
        order, n_sel = _compact_rows(selected)
        self.n_sel = n_sel
        # One host read sizes the gather (the torch path is the CPU path; free there).
        if B * L > 0:
            stats = torch.stack([n_sel.max(), n_sel.min(),
                                 torch.where(selected, torch.arange(L, device=q.device), -1).max()])
            m_max, m_min, last = (int(v) for v in stats.tolist())
        else:
            m_max, m_min, last = 0, 0, -1
        self.has_invalid_rows = m_min < m_max
        self.M = m_max
        self.n_keys = last + 1  # keys after the last selected query get no mass
        self.rows = order[:, :m_max]  # [B, M]
        self.row_valid = torch.arange(m_max, device=q.device)[None, :] < n_sel[:, None]  # [B, M]
        self.real = real
        # Chunk sizes: fp32 logits [B, Hkv, G*R, N] <= chunk_bytes.
        per_elem = B * Hq * torch.tensor([], dtype=self.cdt).element_size()
        budget = max(1, opts.chunk_bytes // max(per_elem, 1))
        n_keys = max(self.n_keys, 1)
        # Prefer whole key ranges (one fused softmax per row chunk) while >= 8 rows fit.
        self.N = min(n_keys, max(16, budget // max(min(m_max, 8), 1)))
        self.R = max(1, min(max(m_max, 1), budget // self.N))

    def row_chunks(self):
        for r0 in range(0, self.M, self.R):
            yield r0, min(self.M, r0 + self.R)

    def key_chunks(self):
        for n0 in range(0, self.n_keys, self.N):
            yield n0, min(self.n_keys, n0 + self.N)

    def gather_q(self, q, r0, r1):
        """fp32 selected rows [B, Hkv, G*R, D] of q (head h = kvh * G + g)."""
        rows = self.rows[:, r0:r1]
        R = rows.shape[1]
        idx = rows[:, None, :, None].expand(self.B, self.Hq, R, self.D)
        qc = torch.gather(q, 2, idx).to(self.cdt)
        return qc.reshape(self.B, self.Hkv, self.G * R, self.D)

    def allowed(self, r0, r1, n0, n1):
        """bool [B, 1, 1, R, N]: causal, real key, valid row."""
        rpos = self.rows[:, r0:r1]  # [B, R]
        kpos = torch.arange(n0, n1, device=rpos.device)
        ok = (kpos[None, None, :] <= rpos[:, :, None]) & self.real[:, None, n0:n1]
        ok = ok & self.row_valid[:, r0:r1, None]
        return ok[:, None, None]

    def logits(self, qc, k, r0, r1, n0, n1, scale):
        """fp32 logits [B, Hkv, G, R, N] (masked entries hold -inf)."""
        kc = k[:, :, n0:n1].to(self.cdt)
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        s = s.view(self.B, self.Hkv, self.G, r1 - r0, n1 - n0)
        return s.masked_fill(~self.allowed(r0, r1, n0, n1), float("-inf"))

    def lse_rows(self, lse, r0, r1):
        """Supplied lse [B, Hq, L] at the chunk's rows -> [B, Hkv, G, R]."""
        rows = self.rows[:, r0:r1]
        got = torch.gather(lse, 2, rows[:, None, :].expand(self.B, self.Hq, rows.shape[1]))
        got = got.to(self.cdt).view(self.B, self.Hkv, self.G, rows.shape[1])
        # Invalid (padding) rows: any finite value; their probabilities are masked anyway.
        return torch.where(self.row_valid[:, None, None, r0:r1], got, torch.zeros((), dtype=self.cdt, device=got.device))


def _probs(s, lse):
    """exp(s - lse) with -inf logits -> exactly 0 (lse finite)."""
    return torch.exp(s - lse[..., None])


def _torch_forward(q, k, selected, real, lse, opts, need_lse=True):
    plan = _TorchPlan(q, k, selected, real, opts)
    B, Hq, L = plan.B, plan.Hq, plan.L
    mass = torch.zeros(B, plan.Hkv, plan.G, L, dtype=plan.cdt, device=q.device)
    lse_out = torch.zeros(B, Hq, plan.M, dtype=plan.cdt, device=q.device)
    single = plan.N >= plan.n_keys
    for r0, r1 in plan.row_chunks():
        qc = plan.gather_q(q, r0, r1)
        valid = plan.row_valid[:, None, None, r0:r1]  # [B, 1, 1, R]
        if single:
            # Whole key range in one chunk: one fused softmax (or exp(s - lse) with lse given).
            n1 = plan.n_keys
            s = plan.logits(qc, k, r0, r1, 0, n1, opts.scale)
            if lse is not None:
                lse_c = plan.lse_rows(lse, r0, r1)
                p = _probs(s, lse_c)
            else:
                p = torch.softmax(s, dim=-1)
                if plan.has_invalid_rows:  # padding rows of the gather: all keys masked -> NaN
                    p = torch.where(valid[..., None], p, torch.zeros((), dtype=p.dtype, device=p.device))
                if need_lse:
                    lse_c = torch.logsumexp(s, dim=-1)
                    lse_c = torch.where(valid, lse_c, torch.zeros_like(lse_c))
            if lse is not None or need_lse:
                lse_out[:, :, r0:r1] = lse_c.reshape(B, Hq, r1 - r0)
            mass[..., :n1] += p.sum(dim=-2)
            continue
        if lse is not None:
            lse_c = plan.lse_rows(lse, r0, r1)
        else:
            m = torch.full((B, plan.Hkv, plan.G, r1 - r0), float("-inf"), dtype=plan.cdt, device=q.device)
            acc = torch.zeros_like(m)
            for n0, n1 in plan.key_chunks():
                s = plan.logits(qc, k, r0, r1, n0, n1, opts.scale)
                m_new = torch.maximum(m, s.amax(dim=-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                acc = acc * torch.exp(m - m_safe) + torch.exp(s - m_safe[..., None]).sum(dim=-1)
                m = m_new
            lse_c = torch.where(valid, m + torch.log(acc), torch.zeros_like(m))
        lse_out[:, :, r0:r1] = lse_c.reshape(B, Hq, r1 - r0)
        for n0, n1 in plan.key_chunks():
            s = plan.logits(qc, k, r0, r1, n0, n1, opts.scale)
            mass[..., n0:n1] += _probs(s, lse_c).sum(dim=-2)
    denom = plan.n_sel.clamp(min=1).to(plan.cdt)
    mass = mass.view(B, Hq, L) / denom[:, None, None]
    # the LSE at every position (0 where no row is selected): the backward gathers its rows
    lse_full = torch.zeros(B, Hq, L, dtype=plan.cdt, device=q.device)
    if need_lse or lse is not None:
        rows = plan.rows[:, None, :].expand(B, Hq, plan.M)
        lse_full.scatter_(2, rows, lse_out * plan.row_valid[:, None, :])
    return mass, lse_full


def _torch_backward(q, k, grad, selected, real, lse_full, opts):
    """grad: [B, Hq, L] upstream gradient of the per-head mass; lse_full: [B, Hq, L] row LSE."""
    plan = _TorchPlan(q, k, selected, real, opts)
    scale = opts.scale
    B, Hq, Hkv, G, L, D = plan.B, plan.Hq, plan.Hkv, plan.G, plan.L, plan.D
    cdt = plan.cdt
    gk = (grad.to(cdt) / plan.n_sel.clamp(min=1).to(cdt)[:, None, None]).view(B, Hkv, G, L)
    dq_sel = torch.zeros(B, Hq, plan.M, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hkv, L, D, dtype=cdt, device=q.device)
    single = plan.N >= plan.n_keys
    for r0, r1 in plan.row_chunks():
        R = r1 - r0
        qc = plan.gather_q(q, r0, r1)  # [B, Hkv, G*R, D]
        lse_r = plan.lse_rows(lse_full, r0, r1)  # [B, Hkv, G, R]
        delta = torch.zeros(B, Hkv, G, R, dtype=cdt, device=q.device)
        p_first = None
        for n0, n1 in plan.key_chunks():
            p = _probs(plan.logits(qc, k, r0, r1, n0, n1, scale), lse_r)
            delta += (p * gk[:, :, :, None, n0:n1]).sum(dim=-1)
            if single:
                p_first = p
        dqc = torch.zeros(B, Hkv, G * R, D, dtype=cdt, device=q.device)
        for n0, n1 in plan.key_chunks():
            p = p_first if p_first is not None else _probs(plan.logits(qc, k, r0, r1, n0, n1, scale), lse_r)
            ds = (p * (gk[:, :, :, None, n0:n1] - delta[..., None])).reshape(B, Hkv, G * R, n1 - n0)
            kc = k[:, :, n0:n1].to(cdt)
            dqc += torch.matmul(ds, kc)
            dk[:, :, n0:n1] += torch.matmul(ds.transpose(-1, -2), qc)
        dq_sel[:, :, r0:r1] = dqc.view(B, Hkv, G, R, D).reshape(B, Hq, R, D)
    dq_sel = dq_sel * scale
    dq = torch.zeros(B, Hq, L, D, dtype=cdt, device=q.device)
    idx = plan.rows[:, None, :, None].expand(B, Hq, plan.M, D)
    dq_sel = dq_sel * plan.row_valid[:, None, :, None]
    dq.scatter_add_(2, idx, dq_sel)
    return dq.to(q.dtype), (dk * scale).to(k.dtype)


# --------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------


def _triton_blocks(q, opts):
    blocks = attention_mass_config(q.shape[-1], q.dtype, interpret=interpret_mode())
    blocks["DOT_PREC"] = "ieee" if q.dtype == torch.float32 else "tf32"
    if opts.block_m is not None:
        blocks["BLOCK_M"] = opts.block_m
    if opts.block_n is not None:
        blocks["BLOCK_N"] = opts.block_n
    return blocks


def _launch(kernel, block: str, n: int, programs: int, args, blocks) -> None:
    """Launch ``kernel`` on a grid of (blocks of ``n`` rows or keys, ``programs``), where
    ``block`` ("BLOCK_M" for row-oriented kernels, "BLOCK_N" for key-oriented ones) sizes the
    first axis: the fixed heuristics, or with ALIGN_TI_AUTOTUNE=1 the autotuned choice."""
    fixed = dict(BLOCK_D=blocks["BLOCK_D"], DOT_PREC=blocks["DOT_PREC"])
    if _heur.autotune_enabled():
        _kernel(kernel)[lambda meta: (_grid(n, meta[block]), programs)](*args, **fixed)
    else:
        kernel[(_grid(n, blocks[block]), programs)](
            *args, BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], num_warps=blocks["num_warps"], **fixed)


def _device_rows(selected, real):
    """What the kernels read: the row order, selected-row counts (int32) and real keys (int8)."""
    order, n_sel = _compact_rows(selected)
    return order, n_sel.to(torch.int32), real.to(torch.int8).contiguous()


def _triton_forward(q, k, selected, real, lse, opts):
    from align_ti.kernels.attention_mass import (
        attention_mass_fwd_kernel,
        attention_mass_lse_kernel,
    )

    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    order, n_sel32, real_i8 = _device_rows(selected, real)
    blocks = _triton_blocks(q, opts)
    if lse is None:
        lse_buf = torch.zeros(B, Hq, L, dtype=torch.float32, device=q.device)
        _launch(attention_mass_lse_kernel, "BLOCK_M", L, B * Hq, (
            q, k, order, n_sel32, real_i8, lse_buf,
            *q.stride(), *k.stride(), *lse_buf.stride(),
            Hq, Hkv, L, D, opts.scale * _LOG2E), blocks)
    else:
        lse_buf = lse.to(torch.float32, copy=True)  # an op output never aliases an input
    mass = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    _launch(attention_mass_fwd_kernel, "BLOCK_N", L, B * Hq, (
        q, k, order, n_sel32, real_i8, lse_buf, mass,
        *q.stride(), *k.stride(), *lse_buf.stride(), *mass.stride(),
        Hq, Hkv, L, D, opts.scale * _LOG2E), blocks)
    return mass, lse_buf


def _triton_backward(q, k, grad, selected, real, lse_buf, opts):
    from align_ti.kernels.attention_mass import (
        attention_mass_bwd_dk_kernel,
        attention_mass_bwd_dq_kernel,
    )

    order, n_sel32, real_i8 = _device_rows(selected, real)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    blocks = _triton_blocks(q, opts)
    g = (grad.to(torch.float32) / n_sel32.clamp(min=1).to(torch.float32)[:, None, None]).contiguous()
    dq = torch.zeros(B, Hq, L, D, dtype=torch.float32, device=q.device)
    delta = torch.zeros(B, Hq, L, dtype=torch.float32, device=q.device)
    _launch(attention_mass_bwd_dq_kernel, "BLOCK_M", L, B * Hq, (
        q, k, order, n_sel32, real_i8, lse_buf, g, delta, dq,
        *q.stride(), *k.stride(), *lse_buf.stride(), *g.stride(), *delta.stride(), *dq.stride(),
        Hq, Hkv, L, D, opts.scale * _LOG2E, opts.scale), blocks)
    dk = torch.empty(B, Hkv, L, D, dtype=torch.float32, device=q.device)
    _launch(attention_mass_bwd_dk_kernel, "BLOCK_N", L, B * Hkv, (
        q, k, order, n_sel32, real_i8, lse_buf, g, delta, dk,
        *q.stride(), *k.stride(), *lse_buf.stride(), *g.stride(), *delta.stride(), *dk.stride(),
        Hq, Hkv, L, D, opts.scale * _LOG2E, opts.scale), blocks)
    return dq.to(q.dtype), dk.to(k.dtype)


_LOG2E = 1.4426950408889634


def _grid(n: int, block: int) -> int:
    """Programs along one axis: at least one, so an empty axis still launches (and exits)."""
    return max(1, cdiv(n, block))


def _kernel(fn):
    """A kernel as launched: itself, or with ALIGN_TI_AUTOTUNE=1 wrapped in triton.autotune
    over ``heuristics.attention_mass_autotune_configs()`` (BLOCK_M, BLOCK_N, num_warps)."""
    if not _heur.autotune_enabled():
        return fn
    if fn not in _autotuned:
        import triton

        _autotuned[fn] = triton.autotune(configs=_heur.attention_mass_autotune_configs(),
                                         key=["Hq", "Hkv", "L", "D"])(fn)
    return _autotuned[fn]


_autotuned: dict = {}


# --------------------------------------------------------------------------------------
# torch.library ops and their autograd formula
# --------------------------------------------------------------------------------------


def _options(scale, impl, chunk_bytes, block_m, block_n) -> AttentionMassOptions:
    return AttentionMassOptions(scale=scale, impl=impl, chunk_bytes=chunk_bytes, block_m=block_m,
                                block_n=block_n)


@torch.library.custom_op("align_ti::attention_mass", mutates_args=())
@without_autocast
def _attention_mass_op(
    q: torch.Tensor, k: torch.Tensor, selected: torch.Tensor, real: torch.Tensor,
    lse: Optional[torch.Tensor], scale: float, impl: str, chunk_bytes: int,
    block_m: Optional[int], block_n: Optional[int], need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass [B, Hq, L] per head, already divided by the selected-row count; the row LSE
    [B, Hq, L] at selected positions, what the backward reads: the supplied one, or computed
    when ``need_lse``, else zeros)."""
    opts = _options(scale, impl, chunk_bytes, block_m, block_n)
    if opts.impl == "triton" and q.numel() > 0:
        return _triton_forward(q, k, selected, real, lse, opts)
    return _torch_forward(q, k, selected, real, lse, opts, need_lse=need_lse)


@_attention_mass_op.register_fake
def _(q, k, selected, real, lse, scale, impl, chunk_bytes, block_m, block_n, need_lse):
    B, Hq, L, _ = q.shape
    cdt = torch.float32 if impl == "triton" else _compute_dtype(q.dtype)
    return q.new_empty((B, Hq, L), dtype=cdt), q.new_empty((B, Hq, L), dtype=cdt)


@torch.library.custom_op("align_ti::attention_mass_backward", mutates_args=())
@without_autocast
def _attention_mass_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, selected: torch.Tensor,
    real: torch.Tensor, lse: torch.Tensor, scale: float, impl: str, chunk_bytes: int,
    block_m: Optional[int], block_n: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) in the dtypes of q and k, for the upstream gradient ``grad`` [B, Hq, L]."""
    opts = _options(scale, impl, chunk_bytes, block_m, block_n)
    if opts.impl == "triton" and q.numel() > 0:
        return _triton_backward(q, k, grad, selected, real, lse, opts)
    return _torch_backward(q, k, grad, selected, real, lse, opts)


@_attention_mass_backward_op.register_fake
def _(grad, q, k, selected, real, lse, scale, impl, chunk_bytes, block_m, block_n):
    return torch.empty_like(q), torch.empty_like(k)


_OPTION_NAMES = ("scale", "impl", "chunk_bytes", "block_m", "block_n")


def _setup_context(ctx, inputs, output):
    q, k, selected, real, _lse = inputs[:5]
    ctx.options = inputs[5:10]
    ctx.mark_non_differentiable(output[1])
    save_inputs(ctx, (q, k, selected, real, output[1]))


def _backward(ctx, grad, _grad_lse):
    refuse_double_backward("attention_mass")
    q, k, selected, real, lse = saved_inputs(ctx)
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_q or need_k):
        dq = dk = None
    else:
        dq, dk = torch.ops.align_ti.attention_mass_backward(grad, q, k, selected, real, lse, *ctx.options)
    return (dq if need_q else None), (dk if need_k else None), *([None] * 9)


torch.library.register_autograd("align_ti::attention_mass", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    query_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    average_heads: bool = True,
    impl: str = "auto",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Instruction->key attention mass of one layer, without materialising attention.

    For IRS and IVA (METHOD.md): how much attention the selected (instruction) queries pay
    to each key, averaged over those queries and over heads, computed from the post-RoPE
    ``q`` / ``k`` that the layer hands to its attention function (see ``capture_qk``).

    Args:
        q: ``[B, Hq, L, D]`` post-RoPE queries (fp16 / bf16 / fp32; fp64 on the torch path).
        k: ``[B, Hkv, L, D]`` post-RoPE keys, same dtype and device; ``Hq`` must be a multiple
            of ``Hkv``; query head ``h`` uses key head ``h // (Hq // Hkv)`` (GQA).
        query_mask: bool ``[B, L]``: the queries to average over (instruction tokens).
        attention_mask: ``[B, L]`` bool or integer 0/1, 1 = real token; None = all real.
            Left or right padding, or holes, are all fine.
        scale: finite softmax scale > 0; None = ``D ** -0.5``.
        lse: optional natural-log log-sum-exp ``[B, Hq, L]`` of the scaled logits over the
            same keys (as returned by flash-attn / SDPA / FlexAttention); when given, the
            first pass over the keys is skipped. Only its entries at selected queries are
            read, and those must be finite (a content check). It gets no gradient; the
            gradients to q and k are those of the exact softmax either way.
        average_heads: True -> ``[B, L]``; False -> per head ``[B, Hq, L]``.
        impl: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        chunk_bytes: torch path only: bound on one chunk of fp32 logits, bytes or e.g. "4M"
            (default 2 MiB, heuristics.ATTENTION_MASS_CHUNK_BYTES).

    Semantics (DESIGN.md):
        Selected queries are ``query_mask & attention_mask``. Query ``i`` attends to keys
        ``j <= i`` with ``attention_mask[j] == 1``; ``P[h, i, j] = softmax_j(scale q_i . k_j)``
        with fp32 logits. ``mass[b, j]`` is the mean over selected ``i`` of ``P[h, i, j]``,
        then the mean over heads. A sample with no selected query gets zeros (and zero
        gradients); padding keys and keys after the last selected query get exactly 0.

    Cost:
        Work is ``O(n_selected * L * D)`` per head and extra memory ``O(B * Hq * L)`` plus
        one bounded tile/chunk of logits: ``[B, H, L, L]`` is never held. The Triton path
        does no host sync; the torch path reads the selected-row count once.

    Returns:
        fp32 ``[B, L]`` (or ``[B, Hq, L]``); fp64 for fp64 input on the torch path.
        Differentiable in ``q`` and ``k``.

    Raises:
        TypeError / ValueError naming the argument for wrong ranks, dtypes, shapes,
        devices, head counts (``Hq % Hkv != 0``), mask or ``lse`` shapes, or options.
    """
    scale = check_attention_mass_args(q, k, query_mask, attention_mask, scale, average_heads)
    _check_lse(lse, q)
    check_choice("impl", impl, ("auto", "triton", "torch"))
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "triton":
        if q.dtype == torch.float64:
            raise TypeError(f"impl='triton' supports fp16 / bf16 / fp32 inputs, got q {describe(q)}")
        if not q.is_cuda and not interpret_mode():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                f"imported); q is on {q.device}. Use impl='torch' or 'auto'."
            )
    chunk_bytes = resolve_chunk_bytes(chunk_bytes) or ATTENTION_MASS_CHUNK_BYTES

    B, Hq, L, _ = q.shape
    real = (
        torch.ones(B, L, dtype=torch.bool, device=q.device)
        if attention_mask is None
        else attention_mask != 0
    )
    selected = query_mask & real
    if lse is not None:
        lse = lse.detach()
        if value_checks_enabled() and lse.numel():
            bad = selected[:, None, :] & ~torch.isfinite(lse)
            if bool(bad.any()):
                raise ValueError(f"lse must be finite at the selected queries; it holds NaN or inf "
                                 f"there ({describe(lse)})")
    need_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    mass, _ = torch.ops.align_ti.attention_mass(q, k, selected, real, lse, scale, impl, chunk_bytes,
                                                None, None, need_lse)
    if average_heads:
        mass = mass.mean(dim=1)
    return mass
