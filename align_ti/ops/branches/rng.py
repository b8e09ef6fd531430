"""TPA's counter-based randomness: every random number is a hash of (seed, sample id, epoch,
step, token id), so the branched positions and the candidates of a sample do not depend on the
batch it is in, on its padding, on the row chunking or on the number of processes.
"""
from __future__ import annotations

from typing import Optional

import torch

from align_ti.validation import check_dim, check_tensor, value_checks_enabled

INDEX_DTYPES = (torch.int64, torch.int32)  # accepted for token ids, labels, steps and sample ids

M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never
# overflows on any device (lowbias32-style integer hash).
_C1 = 0x7FEB352D
_C2 = 0x5BD1E995
STREAM_STEPS = 0x1B873593   # which positions are branched
STREAM_GUMBEL = 0x68E31DA4  # candidate noise, per step
STREAM_COLS = 0x2C1B3C6D    # candidate noise, per token id


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer hash of int64 values in [0, 2**32) (stays in that range)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & M32
    x = x ^ (x >> 15)
    x = (x * _C2) & M32
    return x ^ (x >> 16)


def uniform(h: torch.Tensor) -> torch.Tensor:
    """Hash values -> fp32 uniforms in (0, 1) (24 random bits)."""
    return ((h >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def real_offset(attention_mask: Optional[torch.Tensor], batch_size: int, device) -> torch.Tensor:
    """int64 [B]: each sample's first real token (0 without a mask or a real token). The
    randomness keys on positions counted from there, so left padding does not change it."""
    if attention_mask is None:
        return torch.zeros(batch_size, dtype=torch.int64, device=device)
    return attention_mask.to(device).bool().to(torch.int8).argmax(1)  # the first maximum


def sample_keys(seed: int, sample_ids: Optional[torch.Tensor], epoch: int, batch_size: int,
                device) -> torch.Tensor:
    """int64 [B] keys in [0, 2**32): a hash of (seed, sample id, epoch) per sample.

    ``sample_ids`` are int64 [B] ids >= 0 that identify each sample across batches (e.g. the
    dataset index); None uses 0..B-1, which then *does* depend on the batch composition.
    """
    _check_nonneg_int("seed", seed)
    _check_nonneg_int("epoch", epoch)
    if sample_ids is None:
        sid = torch.arange(batch_size, device=device)
    else:
        check_tensor("sample_ids", sample_ids, ndim=1, dtypes=INDEX_DTYPES)
        check_dim("sample_ids", sample_ids, 0, batch_size, "the batch size")
        sid = sample_ids.to(device=device, dtype=torch.int64)
        if value_checks_enabled() and sid.numel() and bool((sid < 0).any()):
            raise ValueError(f"sample_ids must be >= 0, got {sid[sid < 0][:5].tolist()}")
    k = mix32(torch.full_like(sid, (seed & M32) ^ 0x9E3779B9))
    k = mix32(k ^ (sid & M32))
    k = mix32(k ^ ((sid >> 32) & M32))
    k = mix32(k ^ ((seed >> 32) & M32))
    return mix32(k ^ (epoch & M32))


def position_keys(keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """int64 [B, N] keys of one random stream (STREAM_*) per sample and position: ``keys`` [B]
    from `sample_keys`, ``positions`` [B, N] counted from each sample's first real token."""
    return mix32(keys[:, None] ^ mix32(positions ^ stream))
