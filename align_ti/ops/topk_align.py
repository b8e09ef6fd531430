"""IVA: top-k visual-token selection (`select_topk`) and the weighted vocabulary alignment at the
selected tokens, fused with both LM heads (`topk_align`); optional feature-level variant
(`topk_feature_align`, `FeatureProjection`).

Selection (`select_topk`, exactly `align_ti.reference.topk_align.select_topk_reference`):
two stable sorts of each sample's mass ([B, L], O(B L log L), a few microseconds on the GPU)
rank its vision tokens (largest mass first, ties to the lower position); the per-sample kept
count (k clamped, or ceil(ratio * Nv)) is a [B] tensor, so no host sync is needed to select.
The only host sync is the length of the *compact* output (`pad=False`: one read of the number
of kept rows on CUDA, free on CPU). `pad=True` returns a fixed-size [B * cap] layout (cap =
the kept count of a full sample) with zero weights on padding slots and no host sync at all.

`topk_align` implementations:

- ``impl="auto"`` (the default) and ``impl="torch"``: the compact selection, then
  `align_ti.ops.fused_kl.fused_linear_kl` on the flattened [B*L, H] hidden states with the
  selected rows and weights (auto: cuBLAS logits + the Triton row kernel on CUDA, the chunked
  PyTorch path elsewhere; torch: the chunked PyTorch path). The selected rows' hidden states
  are copied per row chunk ([r, H], small next to the chunk's [r, V] logits).
- ``impl="triton"``: the compact selection, then this module's chunked driver with the row
  gather fused into its own matmul kernels. On an H100 (B=8, L=1024, 729 vision tokens,
  Hs=896, Ht=3584, V=151936 bf16; benchmarks/results/h100/topk_align-quick.md) it took 41.7 ms
  and 1651 MiB against 28.0 ms and 1581 MiB for fused_linear_kl on the same rows: cuBLAS
  beats the Triton gather matmuls by far more than the [r, H] copies cost, so "auto" does not
  use it. Per row chunk, the logits of both heads come from `gather_logits_kernel`, which
  loads the selected hidden rows through the index vector (the gather is fused into the
  matmul's loads: no [rows, H] copy of the hidden states, for either model); the per-row
  divergence and its gradient with respect to the student logits reuse
  `align_ti.kernels.fused_kl.fused_kl_rows_kernel` in place over the chunk's logits; the
  student hidden-state gradient of the chunk (a dense g @ W_S matmul) is scattered into the
  [B*L, Hs] gradient by `scatter_rows_kernel` (distinct rows: one writer per row, no atomics),
  and the weight gradient ``g^T h[rows]`` comes from `gather_dw_kernel` (rows gathered through
  the index vector, one program per output tile: deterministic). Gradients are computed in
  the forward (the loss is a scalar) and scaled by the upstream gradient in the backward.
  The hidden-state gradient is written directly in the hidden dtype: no fp32 [B*L, Hs]
  accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops.dispatch import cdiv, interpret_mode, resolve_impl
from align_ti.ops.fused_kl import (
    _enter_backward,
    _grads_in_forward,
    _scale_,
    fused_linear_kl,
    weigh_rows,
)
from align_ti.reference.fused_kl import KLOptions, check_head, resolve_vocab_size
from align_ti.reference.topk_align import check_selection_args, kept_count
from align_ti.validation import (
    check_bool,
    check_choice,
    check_same_device,
    check_tensor,
)

NORMALIZE = ("sample", "token")
FEATURE_LOSSES = ("cosine", "mse")
_DIV_CODE = {"forward": 0, "reverse": 1, "jsd": 2}
_F32 = torch.float32

__all__ = [
    "select_topk",
    "topk_align",
    "topk_feature_align",
    "FeatureProjection",
    "TopkAlignOptions",
    "TopkAlignFunction",
]


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------

def _kept_counts(num_vision: torch.Tensor, k, ratio) -> torch.Tensor:
    """int64 [B]: tokens kept per sample, with `kept_count`'s rules, on the device."""
    if k is not None:
        return num_vision.clamp(max=k)
    if ratio is not None:
        # float64, like the reference's Python float arithmetic: identical rounding
        n = torch.ceil(num_vision.to(torch.float64) * float(ratio) - 1e-9).to(torch.int64)
        return torch.minimum(n, num_vision)
    return num_vision


def _select_dense(mass, vision_mask, k, ratio):
    """(keep bool [B, L], weights fp32 [B, L] (0 off keep), n_keep int64 [B]); no host sync."""
    m = mass.float()
    b_size, length = m.shape
    n_keep = _kept_counts(vision_mask.sum(1), k, ratio)
    # largest mass first, ties to the lower position (stable), then vision tokens first (stable)
    o1 = torch.sort(m, dim=1, descending=True, stable=True).indices
    vis = vision_mask.gather(1, o1).to(torch.int8)
    o2 = torch.sort(vis, dim=1, descending=True, stable=True).indices
    order = o1.gather(1, o2)
    rank = torch.arange(length, device=m.device)
    keep = torch.zeros_like(vision_mask).scatter_(1, order, rank[None, :] < n_keep[:, None])
    w = torch.where(keep, m, torch.zeros((), dtype=_F32, device=m.device))
    total = w.sum(1, keepdim=True)
    ok = total > 0
    w = torch.where(ok, w / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(w))
    return keep, w, n_keep


def _compact(keep, w):
    rows = keep.flatten().nonzero().squeeze(1)  # the one host sync (output length) on CUDA
    return rows, w.flatten().index_select(0, rows)


def _padded(keep, w, n_keep, k, ratio):
    b_size, length = keep.shape
    cap = kept_count(length, k, ratio)
    # kept positions ascending first, then the others ascending (stable sort on the flag)
    pos = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :cap]
    valid = torch.arange(cap, device=keep.device)[None, :] < n_keep[:, None]
    rows = pos + (torch.arange(b_size, device=keep.device) * length)[:, None]
    weights = torch.where(valid, w.gather(1, pos), torch.zeros((), dtype=_F32, device=w.device))
    return rows.flatten(), weights.flatten(), valid.flatten()


def select_topk(mass, vision_mask, k=None, ratio=None, pad=False):
    """IVA's visual-token selection: per sample, the top-k vision tokens by teacher attention mass.

    Per sample b, among its vision tokens (``vision_mask[b]``): keep ``k`` of them (clamped to
    the sample's count Nv_b), or ``ceil(ratio * Nv_b)`` (at least one when Nv_b > 0), or all
    (neither given: the METHOD default "all, weighted"). The kept tokens are those with the
    largest mass; ties go to the lower position. Their weights are the mass renormalised within
    the sample (``w_j / sum_{i in S_b} w_i``); a sample whose kept mass sums to 0 gets weight 0
    on its kept tokens (never NaN); a sample without vision tokens contributes no rows.

    Args:
        mass: float ``[B, L]`` teacher attention mass (e.g. `align_ti.attention_mass` at the
            IRS layer); only vision positions are read, and those must be finite and >= 0.
        vision_mask: bool ``[B, L]``, True at vision (image) tokens; padding is False.
        k: positive int, or None.
        ratio: number in ``(0, 1]``, or None (not both k and ratio).
        pad: False -> the compact layout of the reference; True -> a fixed-size layout.

    Returns:
        ``pad=False``: ``(rows, weights)``: int64 ``[M]`` flat indices into ``B*L`` (sample-major,
        ascending position within a sample) and fp32 ``[M]`` weights; identical to
        `select_topk_reference`. On CUDA this costs one host sync (reading M).
        ``pad=True``: ``(rows, weights, valid)`` of fixed length ``B * cap`` with
        ``cap = min(k, L)``, ``ceil(ratio * L)`` or ``L``: sample b owns slots
        ``[b * cap, (b + 1) * cap)``, its kept rows first (ascending), then padding slots that
        point at other positions of the same sample with weight 0 and ``valid`` False. No host
        sync. ``rows[valid]``, ``weights[valid]`` equal the compact output. Padding rows are
        valid indices with weight 0, so the padded pair can be passed to `fused_linear_kl`
        (``reduction="mean"``) as is, at the cost of computing the padding rows.

    Raises:
        ValueError / TypeError naming the argument: mass not a 2-D float tensor, vision_mask not
        bool or of another shape or device, k <= 0 or not an int, ratio outside (0, 1], both k
        and ratio, NaN, inf or negative mass at a vision token (a content check, see
        `align_ti.set_value_checks`).
    """
    check_selection_args(mass, vision_mask, k, ratio)
    check_bool("pad", pad)
    keep, w, n_keep = _select_dense(mass, vision_mask, k, ratio)
    if pad:
        return _padded(keep, w, n_keep, k, ratio)
    return _compact(keep, w)


# --------------------------------------------------------------------------------------------
# options and argument checks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TopkAlignOptions:
    """Non-tensor options of one `topk_align` call (validated)."""

    kl: KLOptions
    vocab_size: int
    normalize: str = "sample"
    impl: str = "torch"
    chunk_bytes: int = 0  # 0 = align_ti.ops.heuristics
    fp32_weight_grad: bool = True


def _check_sequence_inputs(student_hidden, teacher_hidden, mass, vision_mask):
    check_tensor("student_hidden", student_hidden, ndim=3, floating=True)
    check_tensor("teacher_hidden", teacher_hidden, ndim=3, floating=True)
    if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(
            "teacher_hidden must have the [B, L] of student_hidden: got "
            f"{list(teacher_hidden.shape)} vs {list(student_hidden.shape)}"
        )
    check_tensor("mass", mass, ndim=2, floating=True)
    if mass.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"mass must be [B, L] = {list(student_hidden.shape[:2])} (the first two dims of "
            f"student_hidden), got {list(mass.shape)}"
        )
    check_tensor("vision_mask", vision_mask, ndim=2, dtypes=(torch.bool,))
    if vision_mask.shape != mass.shape:
        raise ValueError(
            f"vision_mask must have the shape of mass: got {list(vision_mask.shape)} vs {list(mass.shape)}"
        )


def _normalized_weights(keep, w, n_keep, normalize):
    if normalize == "token":  # sample b weighs its number of kept tokens
        return w * n_keep[:, None].to(_F32)
    return w


# --------------------------------------------------------------------------------------------
# the Triton driver (CUDA, or CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------

def _ieee(t: torch.Tensor) -> bool:
    """fp32 matmuls in full precision unless torch allows tf32 (as torch.mm does)."""
    return t.dtype == _F32 and not (t.is_cuda and bool(torch.backends.cuda.matmul.allow_tf32))


def _launch_logits(h, idx, weight, bias, ncols, out):
    from align_ti.kernels import topk_align as _k

    r = idx.shape[0]
    cfg = _heur.gather_gemm_config("logits", h.dtype, interpret_mode())
    grid = (cdiv(r, cfg["BLOCK_M"]) * cdiv(ncols, cfg["BLOCK_N"]),)
    _k.gather_logits_kernel[grid](
        h, h.stride(0), h.stride(1), idx, weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else out, out, out.stride(0), r, ncols, h.shape[1],
        HAS_BIAS=bias is not None, IEEE=_ieee(h), **cfg,
    )


def _launch_dw(g, h, idx, dw, db, ncols, accumulate):
    from align_ti.kernels import topk_align as _k

    r = idx.shape[0]
    cfg = _heur.gather_gemm_config("dw", h.dtype, interpret_mode())
    grid = (cdiv(ncols, cfg["BLOCK_N"]), cdiv(h.shape[1], cfg["BLOCK_K"]))
    _k.gather_dw_kernel[grid](
        g, g.stride(0), h, h.stride(0), h.stride(1), idx, dw, dw.stride(0),
        db if db is not None else dw, r, ncols, h.shape[1],
        ACCUMULATE=bool(accumulate), HAS_DB=db is not None, IEEE=_ieee(h), **cfg,
    )


def _launch_scatter(src, idx, dst):
    from align_ti.kernels import topk_align as _k

    r = idx.shape[0]
    block = min(1024, 1 << max(0, dst.shape[1] - 1).bit_length())
    _k.scatter_rows_kernel[(r,)](src, src.stride(0), idx, dst, dst.stride(0), dst.shape[1],
                                 BLOCK_H=block, num_warps=4)


def _launch_rows(zs, zt, v, div_code, beta, inv_t, a, d, need_grad):
    from align_ti.kernels import fused_kl as _kkl

    r = zs.shape[0]
    cfg = _heur.kl_row_config(v, interpret=interpret_mode())
    a_t = a if need_grad else d
    _kkl.fused_kl_rows_kernel[(r,)](
        zs, zs.stride(0), zt, zt.stride(0), zs, zs.stride(0), zs, zs.stride(0),
        d, a_t, a_t, d, d,
        v, v, float(inv_t), float(beta),
        DIVERGENCE=div_code, HAS_CE=False, CE_SHARES_LSE=False, SPLIT_CE=False,
        NEED_GRAD=bool(need_grad), **cfg,
    )


def _grad_hidden(g, weight):
    """fp32 [r, H] = g @ weight (g fp32 [r, ncols]); bf16/fp16 weights as fused_kl does."""
    if weight.dtype == _F32:
        return g @ weight
    if weight.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(g.to(weight.dtype), weight, out_dtype=_F32)
    return g @ weight.to(_F32)


def _triton_driver(hs, ws, bs, ht, wt, bt, rows, coef, opts: TopkAlignOptions,
                   need_dh, need_dw, need_db):
    """loss = sum_i coef_i D_i over the selected rows; gradients for a unit upstream gradient
    (dh in hs.dtype [N, Hs]; dw, db fp32 accumulators) where requested."""
    device = hs.device
    m = rows.shape[0]
    v = opts.vocab_size
    kl = opts.kl
    div_code = _DIV_CODE[kl.divergence]
    inv_t = 1.0 / kl.temperature
    need_grad = need_dh or need_dw or need_db
    per_row = 4 * 2 * v
    r_chunk = _heur.rows_per_chunk(per_row, device, opts.chunk_bytes or None)
    r_chunk = _heur.balanced_rows(m, r_chunk, device)
    buf_s = torch.empty(r_chunk, v, dtype=_F32, device=device)
    buf_t = torch.empty(r_chunk, v, dtype=_F32, device=device)
    d_all = torch.zeros(m, dtype=_F32, device=device)
    dh = torch.zeros(hs.shape, dtype=hs.dtype, device=device) if need_dh else None
    dw_dtype = _F32 if opts.fp32_weight_grad else ws.dtype  # the kernel rounds at its store
    dw = torch.zeros(ws.shape, dtype=dw_dtype, device=device) if need_dw else None
    db = torch.zeros(bs.shape, dtype=_F32, device=device) if need_db else None
    wt_d = wt.detach()
    bt_d = None if bt is None else bt.detach()
    for s in range(0, m, r_chunk):
        e = min(s + r_chunk, m)
        idx = rows[s:e]
        zs, zt = buf_s[: e - s], buf_t[: e - s]
        _launch_logits(hs, idx, ws, bs, v, zs)
        _launch_logits(ht, idx, wt_d, bt_d, v, zt)
        _launch_rows(zs, zt, v, div_code, kl.beta, inv_t, coef[s:e], d_all[s:e], need_grad)
        if not need_grad:
            continue
        g = zs  # the kernel wrote the gradient w.r.t. the raw student logits in place
        if need_dh:
            _launch_scatter(_grad_hidden(g, ws[:v]), idx, dh)
        if need_dw:
            _launch_dw(g, hs, idx, dw, db, v, accumulate=s > 0)
        elif need_db:
            db[:v] += g.sum(0)
    loss = weigh_rows(d_all, coef).sum()  # a row of weight 0 adds 0, even with D = +inf
    return loss, dh, dw, db


class TopkAlignFunction(torch.autograd.Function):
    """Autograd for the Triton path: (hs [N, Hs], ws, bs, ht, wt, bt, rows [M], coef [M], opts)
    -> scalar loss = sum_i coef_i D_i. Gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, rows, coef, opts):
        need = ctx.needs_input_grad
        loss, dh, dw, db = _triton_driver(
            hs, ws, bs, ht, wt, bt, rows, coef, opts,
            bool(need[0]), bool(need[1]), bool(need[2] and bs is not None),
        )
        ctx.save_for_backward(
            dh,
            None if dw is None else dw.to(ws.dtype),
            None if db is None else db.to(bs.dtype),
        )
        ctx.mode = "saved"
        return loss

    @staticmethod
    def backward(ctx, grad):
        _enter_backward(ctx, "topk_align")
        dh, dw, db = ctx.saved_tensors
        out = [None if t is None else _scale_(t, grad) for t in (dh, dw, db)]
        return (out[0], out[1], out[2]) + (None,) * 6


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------

def topk_align(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    mass,
    vision_mask,
    k=None,
    ratio=None,
    normalize="sample",
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    student_bias=None,
    teacher_bias=None,
    impl="auto",
    chunk_bytes=None,
    fp32_weight_grad=True,
):
    """The IVA loss: vocabulary divergence between teacher and student at the vision tokens
    selected by the teacher's instruction->vision attention mass, weighted by that mass.

    Per sample b, `select_topk` keeps the top-k vision tokens S_b by ``mass`` (``k`` tokens,
    ``ceil(ratio * Nv_b)``, or all: the default) with weights ``w_j = mass_j / sum_{S_b} mass``.
    At each kept position j the LM heads give ``z_S = (h_S W_S[:V']^T + b_S[:V']) / T`` and
    ``z_T`` likewise (softmax over the first V' entries, no T^2 factor) and ``D_j`` is the
    divergence of `fused_linear_kl` (``"forward"`` KL(p_T||p_S), ``"reverse"`` KL(p_S||p_T),
    ``"jsd"`` with ``beta``). The loss is

    - ``normalize="sample"`` (default): ``(1 / S) sum_b sum_{j in S_b} w_j D_j``, S = the number
      of samples that contribute (vision tokens with positive kept mass): each sample weighs
      the same, and within a sample each token weighs its share of the mass (METHOD.md's
      L_IVA, averaged over samples);
    - ``normalize="token"``: ``sum_b n_b sum_j w_j D_j / sum_b n_b`` with n_b = |S_b|: each
      sample weighs its number of kept tokens (samples with more vision tokens count more).

    It is 0 (with zero gradients) when no sample contributes (no image in the batch, or all
    kept mass 0). Samples without vision tokens and positions outside the selection never
    influence the result, whatever their hidden states hold. Logits are never held for more
    than one row chunk; the result is an fp32 scalar.

    Args:
        student_hidden: ``[B, L, Hs]`` fp32/bf16/fp16, the student's final hidden states (the
            LM-head input); gets a gradient.
        student_weight: ``[Vs, Hs]`` student LM head, same dtype; gets a gradient.
        teacher_hidden: ``[B, L, Ht]``; never gets a gradient (may differ in dtype).
        teacher_weight: ``[Vt, Ht]``, same dtype as teacher_hidden; never gets a gradient.
        mass: float ``[B, L]``, the teacher's instruction->vision attention mass at the IRS
            layer (`align_ti.attention_mass`); finite and >= 0 at vision tokens (the only
            entries read), no gradient (detached).
        vision_mask: bool ``[B, L]``, True at vision tokens (padding False).
        k: tokens kept per sample (positive int, clamped to the sample's vision tokens), or
        ratio: fraction of each sample's vision tokens in ``(0, 1]`` (``ceil``); neither = all.
        normalize: ``"sample"`` (default) | ``"token"``, see above.
        divergence, beta, temperature, vocab_size, student_bias, teacher_bias: as
            `fused_linear_kl` (V' = ``vocab_size`` or ``min(Vs, Vt)``).
        impl: ``"auto"`` (`fused_linear_kl` on the selected rows with its own "auto": cuBLAS
            + Triton on CUDA, chunked PyTorch elsewhere), ``"torch"`` (the same, chunked
            PyTorch), or ``"triton"`` (the row gather fused into Triton matmul kernels; CUDA,
            or CPU under ``TRITON_INTERPRET=1``; slower than "auto" on an H100, see the
            module docstring).
        chunk_bytes: scratch budget of one row chunk, bytes or e.g. "512M" (None =
            ``align_ti.ops.heuristics``).
        fp32_weight_grad: as `fused_linear_kl`: False accumulates the student weight's
            gradient over the row chunks in the weight's own dtype (one rounding per chunk,
            no fp32 ``[Vs, Hs]`` buffer), on every impl.

    Returns:
        fp32 scalar.

    Implementation, cost and syncs: the selection runs on the device; reading the number of
    kept rows M is the one host sync (free on CPU). ``impl="auto"``/``"torch"`` call
    `fused_linear_kl` on the flattened hidden states with the selected rows and weights.
    ``impl="triton"``
    fuses the row gather into the LM-head matmuls' loads (no ``[M, H]`` copy of hidden states),
    reuses the fused KL row kernel, and scatters the hidden-state gradient into
    ``[B, L, Hs]`` with one writer per row (deterministic, no atomics); the student gradients
    are computed in the forward and scaled by the upstream scalar in the backward (so a second
    backward through one graph is not supported). Work: one pass of each head's matmul over
    the M kept rows plus the two gradient matmuls; memory: one row chunk of fp32 logits for
    both heads plus the gradients, independent of L beyond the inputs.

    Masks: -inf logits (e.g. bias entries) mask vocabulary columns as in `fused_linear_kl`
    (0 log 0 = 0; a kept token of weight 0 adds 0 even where its divergence is +inf).
    NaN/inf: a NaN or inf in a *selected* row's hidden states or in the weights, or a NaN or
    +inf in biases reaching the first V' logits, gives a NaN loss (never a silently wrong
    finite one).

    Raises:
        ValueError / TypeError naming the argument: k <= 0 or not an int, ratio outside (0, 1],
        both k and ratio, mass or vision_mask of a wrong shape/dtype/device, NaN, inf or
        negative mass at a vision token (content checks, see `align_ti.set_value_checks`), hidden
        states that are not [B, L, H] or disagree in [B, L], and every error of
        `fused_linear_kl` (heads, vocab_size, temperature, beta, divergence, impl,
        fp32_weight_grad).
    """
    _check_sequence_inputs(student_hidden, teacher_hidden, mass, vision_mask)
    check_choice("normalize", normalize, NORMALIZE)
    kl_opts = KLOptions(divergence, beta, temperature, "mean")
    b_size, length, hs_w = student_hidden.shape
    n = b_size * length
    hs2 = student_hidden.reshape(n, hs_w)
    ht2 = teacher_hidden.reshape(n, teacher_hidden.shape[2])
    check_head("student", hs2, student_weight, student_bias, None)
    check_head("teacher", ht2, teacher_weight, teacher_bias, n)
    device = check_same_device({
        "student_hidden": student_hidden, "student_weight": student_weight,
        "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
        "student_bias": student_bias, "teacher_bias": teacher_bias,
        "mass": mass, "vision_mask": vision_mask,
    })
    check_selection_args(mass, vision_mask, k, ratio)
    check_bool("fp32_weight_grad", fp32_weight_grad)
    resolve_impl(impl, device)  # the same checks as every op (a clear error for bad impl)
    v = resolve_vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])

    keep, w, n_keep = _select_dense(mass.detach(), vision_mask, k, ratio)
    w = _normalized_weights(keep, w, n_keep, normalize)
    rows, weights = _compact(keep, w)

    # fp16: fused_linear_kl, whose backward applies the upstream gradient (a loss scale)
    # before rounding; the gather kernel computes the gradients in the forward
    if impl in ("auto", "torch") or not _grads_in_forward("mean", student_hidden.dtype):
        return fused_linear_kl(
            hs2, student_weight, ht2, teacher_weight, rows=rows, weights=weights,
            divergence=divergence, beta=beta, temperature=temperature, vocab_size=v,
            reduction="mean", student_bias=student_bias, teacher_bias=teacher_bias,
            impl=impl, chunk_bytes=chunk_bytes, fp32_weight_grad=fp32_weight_grad,
        )

    total = weights.sum()
    ok = total > 0
    coef = torch.where(ok, weights / torch.where(ok, total, torch.ones_like(total)),
                       torch.zeros_like(weights)).contiguous()
    opts = TopkAlignOptions(kl_opts, v, normalize, impl, _heur.resolve_chunk_bytes(chunk_bytes) or 0,
                            fp32_weight_grad)
    return TopkAlignFunction.apply(
        hs2, student_weight, student_bias, ht2.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), rows, coef, opts,
    )


# --------------------------------------------------------------------------------------------
# feature-level variant (optional; off by default in the trainer)
# --------------------------------------------------------------------------------------------

class FeatureProjection(torch.nn.Module):
    """A learnable linear map from student width Hs to teacher width Ht for
    `topk_feature_align` (identity-free: use no projection when the widths agree).
    Initialised so that a square map is the identity and a rectangular one is a scaled
    orthogonal map; trains with the student."""

    def __init__(self, student_width: int, teacher_width: int, bias: bool = False,
                 dtype=None, device=None):
        super().__init__()
        self.proj = torch.nn.Linear(student_width, teacher_width, bias=bias, dtype=dtype, device=device)
        with torch.no_grad():
            torch.nn.init.orthogonal_(self.proj.weight)
            if bias:
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def topk_feature_align(
    student_hidden,
    teacher_hidden,
    mass,
    vision_mask,
    k=None,
    ratio=None,
    normalize="sample",
    loss="cosine",
    projection=None,
):
    """Feature-level IVA variant: cosine distance or MSE between student and teacher hidden
    states at the selected vision tokens, with the selection and weights of `topk_align`.

    ``loss="cosine"``: ``D_j = 1 - cos(P(h_S,j), h_T,j)``; ``loss="mse"``:
    ``D_j = mean_c (P(h_S,j)_c - h_T,j,c)^2``, computed in fp32. P is ``projection`` (e.g. a
    `FeatureProjection` when Hs != Ht, trained with the student) or the identity. The
    reduction over tokens and samples is `topk_align`'s (``normalize``); 0 when no sample
    contributes. The teacher side never gets a gradient.

    Args:
        student_hidden: ``[B, L, Hs]`` (any student layer); gets a gradient.
        teacher_hidden: ``[B, L, Ht]``; detached.
        mass, vision_mask, k, ratio, normalize: as `topk_align`.
        loss: ``"cosine"`` | ``"mse"``.
        projection: a callable ``[M, Hs] -> [M, Ht]`` (nn.Module) or None (then Hs == Ht).

    Returns:
        fp32 scalar. Gathers the M selected rows (``[M, H]``, small next to the vocabulary
        work) in plain PyTorch; one host sync for M on CUDA.

    Raises:
        ValueError / TypeError naming the argument, as `topk_align`, plus an unknown ``loss``
        or a width mismatch without ``projection``.
    """
    _check_sequence_inputs(student_hidden, teacher_hidden, mass, vision_mask)
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("loss", loss, FEATURE_LOSSES)
    check_same_device({"student_hidden": student_hidden, "teacher_hidden": teacher_hidden,
                       "mass": mass, "vision_mask": vision_mask})
    check_selection_args(mass, vision_mask, k, ratio)
    if projection is None and student_hidden.shape[2] != teacher_hidden.shape[2]:
        raise ValueError(
            f"student_hidden width {student_hidden.shape[2]} != teacher_hidden width "
            f"{teacher_hidden.shape[2]}: pass projection=FeatureProjection(Hs, Ht)"
        )
    keep, w, n_keep = _select_dense(mass.detach(), vision_mask, k, ratio)
    w = _normalized_weights(keep, w, n_keep, normalize)
    rows, weights = _compact(keep, w)
    hs = student_hidden.reshape(-1, student_hidden.shape[2]).index_select(0, rows)
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[2]).index_select(0, rows).float()
    if projection is not None:
        hs = projection(hs)
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(f"projection maps to width {hs.shape[-1]}, teacher_hidden has {ht.shape[-1]}")
    hs = hs.float()
    if loss == "cosine":
        d = 1.0 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    else:
        d = (hs - ht).pow(2).mean(-1)
    total = weights.sum()
    ok = total > 0
    return torch.where(ok, (weights * d).sum() / torch.where(ok, total, torch.ones_like(total)),
                       torch.zeros((), dtype=_F32, device=d.device))
