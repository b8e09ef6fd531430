"""TPA candidate sampling: d candidate tokens per branched step from the student's next-token
distribution, through the student head in row chunks (never [rows, V] logits at once), and the
token ids a candidate may never be (`forbidden_token_ids`).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Optional, Sequence

import torch

from align_ti.constants import TPA_STRATEGIES
from align_ti.ops import heuristics
from align_ti.ops.branches.rng import (
    INDEX_DTYPES,
    STREAM_COLS,
    STREAM_GUMBEL,
    mix32,
    position_keys,
    real_offset,
    sample_keys,
    uniform,
)
from align_ti.ops.fused_kl.matmuls import head_logits
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


def forbidden_token_ids(model_or_config, tokenizer=None) -> tuple[tuple[int, ...], Optional[int]]:
    """The default ``(forbidden_ids, vocab_limit)`` for candidate sampling.

    forbidden_ids: the image and video token ids of a (Llava-like) config and the pad token id
    (of the tokenizer, else of the text config); an image token id among the candidates would
    break Llava's image splicing. vocab_limit: ``len(tokenizer)`` (LM-head rows at or above it
    are padding rows that were never trained), or None without a tokenizer.
    """
    config = getattr(model_or_config, "config", model_or_config)
    ids = set()
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0:
        ids.add(pad)
    return tuple(sorted(ids)), (len(tokenizer) if tokenizer is not None else None)


def forbidden_list(forbidden_ids) -> list[int]:
    """forbidden_ids (None, a sequence of ints or an integer tensor) as a sorted list."""
    if forbidden_ids is None:
        return []
    if isinstance(forbidden_ids, torch.Tensor):
        check_tensor("forbidden_ids", forbidden_ids, dtypes=INDEX_DTYPES)
        forbidden_ids = forbidden_ids.flatten().tolist()
    if isinstance(forbidden_ids, (str, bytes)) or not isinstance(forbidden_ids, Iterable):
        raise TypeError(f"forbidden_ids must be None or a sequence of ints, got {forbidden_ids!r}")
    ids = list(forbidden_ids)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in ids):
        raise TypeError(f"forbidden_ids must hold ints, got {ids[:8]!r}")
    return sorted({int(v) for v in ids})


def _nan_or_pos_inf(x: torch.Tensor) -> bool:
    return bool(torch.isnan(x) | (x == float("inf")))


def _banned_columns(ids: list[int], vlim: int, device) -> torch.Tensor:
    """bool [vlim]: True at `ids` (token ids in [0, vlim); built on the host: a short list)."""
    banned = torch.zeros(vlim, dtype=torch.bool)
    if ids:
        banned[torch.tensor(ids)] = True
    if torch.device(device).type == "cuda":  # pinned + non_blocking: the host does not wait
        return banned.pin_memory().to(device, non_blocking=True)
    return banned.to(device)


def _check_candidate_pool(d: int, vlim: int, limit_given: bool, n_banned: int, exclude_ground_truth: bool) -> None:
    """ValueError unless at least d tokens may be a candidate: the first ``vlim`` ids less the
    forbidden ones among them and, when excluded, the ground truth; the message says where
    the count comes from."""
    n_allowed = vlim - n_banned - (1 if exclude_ground_truth else 0)
    if n_allowed >= d:
        return
    pool = f"vocab_limit = {vlim}" if limit_given else f"student_weight's {vlim} rows"
    less = ([f"{n_banned} forbidden_ids"] if n_banned else []) + (["the ground truth"] if exclude_ground_truth else [])
    pool += f", less {' and '.join(less)}" if less else ""
    raise ValueError(f"num_candidates = {d} exceeds the {max(n_allowed, 0)} tokens a candidate may be ({pool})")


def _log_neg_log_uniform(row_key: torch.Tensor, col_key: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, V]: log(-log u) for the counter-based uniforms u of (row, token): minus the
    Gumbel noise of Gumbel-top-d (computed in place, one [rows, V] buffer)."""
    return uniform(mix32(row_key[:, None] ^ col_key[None, :])).log_().neg_().log_()


@torch.no_grad()
def sample_candidates(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    input_ids: torch.Tensor,
    steps: torch.Tensor,
    num_candidates: int = 4,
    strategy: str = "sample",
    temperature: float = 1.0,
    exclude_ground_truth: bool = True,
    forbidden_ids: Optional[Sequence[int]] = None,
    vocab_limit: Optional[int] = None,
    seed: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    epoch: int = 0,
    student_bias: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d candidate tokens per branched step, from a no-grad student pass: int64 [B, S, d].

    The candidates for step t (alternatives to y_t = ``input_ids[b, t]``) come from the student's
    next-token distribution at row t - 1: ``z = student_hidden[b, t-1] @ student_weight[:V]^T
    (+ bias)`` over the first ``V = vocab_limit`` (default: all head rows) token ids.

    - ``strategy="sample"``: d distinct tokens drawn *without replacement* from
      ``softmax(z / temperature)`` restricted to the allowed tokens (Gumbel-top-d: the d largest
      of ``z / temperature + Gumbel noise``).
    - ``strategy="topk"``: the d most likely allowed tokens (temperature is irrelevant).

    Allowed tokens: ids ``< vocab_limit``, not in ``forbidden_ids`` (see
    :func:`forbidden_token_ids` for the defaults a trainer should pass: image/video/pad ids and
    ids >= len(tokenizer)), and, with ``exclude_ground_truth=True`` (the default), not y_t
    itself -- TPA aligns transitions *off* the ground-truth path, which KD already covers;
    ``False`` lets y_t be drawn like any other token.

    Randomness: the Gumbel noise of (step t, token v) is a hash of (seed, ``sample_ids[b]``,
    epoch, t, v), so a sample gets the same candidates in any batch, chunking or process
    count. Pass the dataset index as ``sample_ids``; None uses 0..B-1. t counts from the
    sample's first real token when ``attention_mask`` ([B, L], 1 = real) is given, so left
    padding changes nothing either (without it, t is the absolute position).

    Memory: logits are computed for row chunks only (``heuristics.rows_per_chunk``, or
    ``chunk_bytes``: bytes, or a string such as "512M"); [rows, V] logits are never held at
    once. Empty slots (step -1) get 0.

    A -inf logit (e.g. in ``student_bias``) masks its token: it is never drawn. NaN or +inf in
    the student's logits at a branched row (from student_hidden, student_weight or
    student_bias), or fewer than d unmasked allowed tokens there, raise ValueError (content
    checks, see ``align_ti.set_value_checks``): candidates drawn from them would be arbitrary.
    """
    check_tensor("student_hidden", student_hidden, ndim=3, floating=True)
    b_size, length, width = student_hidden.shape
    check_tensor("student_weight", student_weight, ndim=2, floating=True)
    check_dim("student_weight", student_weight, 1, width, "the hidden size of student_hidden")
    check_same_dtype("student_hidden", student_hidden, "student_weight", student_weight)
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES)
    if input_ids.shape != (b_size, length):
        raise ValueError(f"input_ids must be [B, L] = {[b_size, length]} like student_hidden, got {describe(input_ids)}")
    check_tensor("steps", steps, ndim=2, dtypes=INDEX_DTYPES)
    check_dim("steps", steps, 0, b_size, "the batch size of student_hidden")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates <= 0:
        raise ValueError(f"num_candidates (d) must be an int >= 1, got {num_candidates!r}")
    check_choice("strategy", strategy, TPA_STRATEGIES)
    if strategy == "sample":
        check_positive("temperature", temperature)
    n_vocab = student_weight.shape[0]
    vlim = n_vocab if vocab_limit is None else vocab_limit
    if isinstance(vlim, bool) or not isinstance(vlim, int) or not 0 < vlim <= n_vocab:
        raise ValueError(f"vocab_limit must be None or an int in [1, {n_vocab}] (the student head's rows), "
                         f"got {vocab_limit!r}")
    if student_bias is not None:
        check_tensor("student_bias", student_bias, ndim=1, floating=True)
        check_dim("student_bias", student_bias, 0, n_vocab, "the rows of student_weight")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                             f"got {describe(attention_mask)}")
    check_same_device({"student_hidden": student_hidden, "student_weight": student_weight,
                       "student_bias": student_bias})
    check_bool("exclude_ground_truth", exclude_ground_truth)
    banned_ids = [v for v in forbidden_list(forbidden_ids) if 0 <= v < vlim]
    chunk_bytes = heuristics.resolve_chunk_bytes(chunk_bytes)
    _check_candidate_pool(num_candidates, vlim, vocab_limit is not None, len(banned_ids), exclude_ground_truth)
    device = student_hidden.device
    steps = steps.to(device=device, dtype=torch.int64)
    if value_checks_enabled() and steps.numel():
        bad = (steps != -1) & ((steps < 1) | (steps >= length))
        if bool(bad.any()):
            raise ValueError(f"steps must be -1 or in [1, {length}) (L = {length}), got e.g. {steps[bad][:5].tolist()}")
    n_steps = steps.shape[1]
    d = num_candidates
    valid = steps >= 0
    t = steps.clamp(min=1)
    rows = (torch.arange(b_size, device=device)[:, None] * length + t - 1).reshape(-1)
    gt = input_ids.to(device).long().gather(1, t).reshape(-1)
    gt_in = gt < vlim
    gt_col = torch.where(gt_in, gt, torch.zeros_like(gt)).clamp(min=0)[:, None]
    banned = _banned_columns(banned_ids, vlim, device)
    if strategy == "sample":
        keys = sample_keys(seed, sample_ids, epoch, b_size, device)
        rel = (steps - real_offset(attention_mask, b_size, device)[:, None]).clamp(min=0)
        row_key = position_keys(keys, rel, STREAM_GUMBEL).reshape(-1)
        col_key = mix32(torch.arange(vlim, device=device) ^ STREAM_COLS)
    flat = student_hidden.reshape(b_size * length, width)
    n = rows.numel()
    out = torch.zeros(n, d, dtype=torch.int64, device=device)
    # per row: fp32 logits + (sample) up to three int64 hash temporaries and an fp32 noise row
    per_row = vlim * (4 if strategy == "topk" else 4 + 3 * 8 + 4)
    chunk = heuristics.rows_per_chunk(per_row, device, chunk_bytes)
    neg_inf = torch.full((), float("-inf"), device=device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = flat.index_select(0, rows[s:e])
        z = torch.empty(e - s, vlim, dtype=torch.float32, device=device)
        head_logits(h, student_weight, student_bias, vlim, z)
        # one reduction finds both: max propagates NaN, and +inf is the max (an all -inf row: masked)
        if value_checks_enabled() and _nan_or_pos_inf(z.max()):
            raise ValueError("student_hidden, student_weight or student_bias hold NaN or inf: the "
                             "student's logits at a branched row are NaN or +inf (-inf masks a token)")
        if strategy == "sample":
            if temperature != 1.0:
                z.div_(temperature)
            z.sub_(_log_neg_log_uniform(row_key[s:e], col_key))  # + Gumbel noise = - log(-log u)
        z.masked_fill_(banned, float("-inf"))
        if exclude_ground_truth:
            cur = z.gather(1, gt_col[s:e])
            z.scatter_(1, gt_col[s:e], torch.where(gt_in[s:e, None], neg_inf, cur))
        top = z.topk(d, dim=1)
        if value_checks_enabled() and bool((valid.reshape(-1)[s:e] & (top.values[:, -1] == float("-inf"))).any()):
            raise ValueError(f"num_candidates = {d} exceeds the allowed tokens at a branched step whose "
                             "student logits are -inf (masked) at all but fewer than d of them")
        out[s:e] = top.indices
    out = out.view(b_size, n_steps, d)
    return torch.where(valid[:, :, None], out, torch.zeros((), dtype=torch.int64, device=device))
