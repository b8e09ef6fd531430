"""The one place for chunk sizes, Triton block sizes and warp counts.

Every op asks this module how to split its work; nothing else hard-codes a block size.

- Row chunks are sized by *bytes*, not rows: an op says how many bytes of scratch one row
  needs (e.g. fp32 logits of both heads) and gets the number of rows that fit the budget.
  The budget is `CHUNK_BYTES[device type]`, or `ALIGN_TI_CHUNK_BYTES` (bytes; suffixes K, M, G
  allowed) when set, or an explicit override passed by the caller (tests use it to check
  that results do not depend on the chunking).
- Triton launch configurations are fixed heuristics by default. `ALIGN_TI_AUTOTUNE=1` makes
  the launchers wrap every kernel in `triton.autotune` over its `*_autotune_configs()` instead.
"""
from __future__ import annotations

import os

import torch

MiB = 1 << 20

# Scratch budget per op call for one row chunk (all per-row buffers together).
# CPU: the fused KL's chunk holds the fp32 logits of both heads (~165 rows of two
# 151936-wide heads at 192 MiB); the torch path's own temporaries are per sub-block
# (ELEMENTWISE_BYTES), outside this budget. At N=1024, Hs=256, Ht=512, V=151936 fp32, MKL's
# four matmuls per chunk take ~3.5 s at 54 rows, ~2.4 s at 110 and ~2.2 s at 165 (M=1024:
# ~2.0 s), while the peak extra memory of the op is 314 / 357 / 421 MiB at 128 / 192 /
# 256 MiB (the materialised-logits path: ~4150 MiB; the target is <= 10%).
# CUDA: a few hundred rows of V=151936, which keeps cuBLAS at full speed.
CHUNK_BYTES = {"cpu": 192 * MiB, "cuda": 1024 * MiB}
_DEFAULT_CHUNK_BYTES = 256 * MiB


def parse_bytes(text, name: str = "ALIGN_TI_CHUNK_BYTES") -> int:
    """A positive byte count from an int or a string with an optional K/M/G suffix ("512M",
    "1.5G", "4096"); a ValueError naming `name` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip().upper().removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
        try:
            value = int(float(raw[:-1] if scale != 1 else raw) * scale)
        except ValueError:
            value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive byte count (e.g. 536870912 or 512M), got {text!r}")
    return value


def resolve_chunk_bytes(value, name: str = "chunk_bytes") -> int | None:
    """An op's ``chunk_bytes`` argument: None (the heuristics decide), or a positive byte count
    given as an int or a string such as "512M"; a ValueError naming `name` otherwise."""
    return None if value is None else parse_bytes(value, name)


def chunk_bytes(device: torch.device) -> int:
    """The scratch budget in bytes for one row chunk on `device`."""
    env = os.environ.get("ALIGN_TI_CHUNK_BYTES")
    if env:
        return parse_bytes(env)
    return CHUNK_BYTES.get(torch.device(device).type, _DEFAULT_CHUNK_BYTES)


def rows_per_chunk(bytes_per_row: int, device: torch.device, budget: int | None = None) -> int:
    """How many rows fit the budget when each row needs `bytes_per_row` bytes (>= 1 row)."""
    budget = chunk_bytes(device) if budget is None else int(budget)
    rows = max(1, budget // max(1, int(bytes_per_row)))
    if torch.device(device).type == "cuda" and rows >= 64:
        rows -= rows % 64  # whole MMA tiles for cuBLAS
    return rows


def balanced_rows(n_rows: int, max_rows: int, device: torch.device) -> int:
    """Rows per chunk for `n_rows` rows in as few chunks as `max_rows` allows, of about one
    size (8192 rows at 3000 per chunk: 3 chunks of 2752, not 3000 + 3000 + 2192), so no small
    last chunk runs the matmuls at low efficiency. Never above `max_rows` (the budget). On CUDA
    the size is rounded up to whole 64-row tiles where the budget allows, so the last chunk
    can still be the smaller one (8192 at 704: 683 -> 704, 11 x 704 + 448)."""
    max_rows = max(1, int(max_rows))
    n_rows = max(1, int(n_rows))
    if n_rows <= max_rows:
        return n_rows
    chunks = -(-n_rows // max_rows)
    rows = -(-n_rows // chunks)
    if torch.device(device).type == "cuda" and max_rows >= 64:
        rows = min(max_rows, -(-rows // 64) * 64)  # whole MMA tiles where the budget allows
    return rows


#: The torch path's elementwise temporaries (log-probs etc.) are made for sub-blocks of a
#: row chunk that fit this many bytes. CPU: a few MiB keeps the ~10 elementwise passes over
#: cache-resident rows (measured at V=151936, 165-row chunks: 16-row blocks 0.63 s vs 0.79 s
#: for the whole chunk at N=1024) and the temporaries out of the chunk budget. Elsewhere
#: (impl="torch" on CUDA) one block per chunk: more launches would cost more than they save.
ELEMENTWISE_BYTES = {"cpu": 16 * MiB}


def elementwise_rows(bytes_per_row: int, device: torch.device) -> int:
    """Rows per sub-block of the torch path's elementwise work (>= 1)."""
    budget = ELEMENTWISE_BYTES.get(torch.device(device).type)
    if budget is None:
        return 1 << 62
    return max(1, budget // max(1, int(bytes_per_row)))


def vocab_block_rows(width: int, device: torch.device, budget: int | None = None) -> int:
    """Rows of a [V, width] weight to upcast to fp32 at a time (CPU bf16/fp16 path)."""
    budget = (chunk_bytes(device) // 4) if budget is None else int(budget)
    return max(256, budget // max(1, 4 * int(width)))


def autotune_enabled() -> bool:
    return os.environ.get("ALIGN_TI_AUTOTUNE", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def kl_row_config(n_cols: int, interpret: bool = False) -> dict:
    """BLOCK_V and num_warps for the fused KL row kernel (one program per row, the vocabulary
    streamed in BLOCK_V-wide blocks)."""
    if interpret:
        # The interpreter runs each program in numpy: fewer, wider blocks are faster.
        return {"BLOCK_V": min(1024, _next_pow2(n_cols)), "num_warps": 4}
    # H100, 512 rows x 151936 fp32 logits, forward KL with gradient (benchmarks/results/h100/
    # profile_fused_kl.md): 4096 x 8 warps moved 2759 GB/s, 4096 x 16 2460, 2048 x 8 2645,
    # 1024 x 4 2450, 8192 x 16 2739.
    block = min(4096, _next_pow2(n_cols))
    warps = 4 if block <= 1024 else 8
    return {"BLOCK_V": block, "num_warps": warps}


def kl_row_autotune_configs():
    """Candidate configurations for `ALIGN_TI_AUTOTUNE=1` (imports triton lazily)."""
    import triton

    return [
        triton.Config({"BLOCK_V": b}, num_warps=w)
        for b, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
    ]


# ----------------------------------------------------------------------------------------
# attention_mass (align_ti/ops/attention_mass.py)
# ----------------------------------------------------------------------------------------

#: Torch path: bytes of one chunk of fp32 logits [B, H, rows, keys]. Deliberately small
#: (not CHUNK_BYTES): the op exists to stay far below eager's [B, H, L, L] (target <= 1/50
#: at L = 2048), and a handful of instruction rows already fill the matmuls.
ATTENTION_MASS_CHUNK_BYTES = 2 * MiB


def attention_mass_config(head_dim: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """BLOCK_M (selected rows), BLOCK_N (keys), BLOCK_D and num_warps for the attention-mass
    kernels (fixed: the kernels are memory-light and not the training bottleneck; see
    `attention_mass_autotune_configs` for ALIGN_TI_AUTOTUNE=1)."""
    block_d = max(16, _next_pow2(head_dim))
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": block_d, "num_warps": 4}
    warps = 8 if (block_d >= 128 and dtype == torch.float32) else 4
    return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": block_d, "num_warps": warps}


def attention_mass_autotune_configs():
    """Candidates (BLOCK_M, BLOCK_N, num_warps) of every attention-mass kernel under
    `ALIGN_TI_AUTOTUNE=1` (BLOCK_D stays the head dim's); imports triton lazily."""
    import triton

    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
        for m, n, w in ((16, 64, 4), (32, 64, 4), (32, 64, 8), (64, 64, 8), (32, 128, 8))
    ]


# --------------------------------------------------------------------------------------
# topk_align (align_ti/ops/topk_align/gather.py): gather matmuls and the row scatter
# --------------------------------------------------------------------------------------

def topk_align_gemm_config(kind: str, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Tile sizes of topk_align's gather matmuls ("logits": gathered rows x vocabulary;
    "dw": the weight gradient over gathered rows)."""
    if interpret:
        if kind == "logits":
            return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}
        return {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 4}
    wide = dtype != torch.float32
    if kind == "logits":
        return {"BLOCK_M": 128, "BLOCK_N": 256 if wide else 128, "BLOCK_K": 64 if wide else 32,
                "num_warps": 8, "num_stages": 3}
    return {"BLOCK_N": 128, "BLOCK_K": 128 if wide else 64, "BLOCK_R": 64 if wide else 32,
            "num_warps": 8, "num_stages": 3}


def topk_align_scatter_config(width: int) -> dict:
    """BLOCK_H and num_warps of topk_align's row scatter (one program per row)."""
    return {"BLOCK_H": min(1024, _next_pow2(width)), "num_warps": 4}


def topk_align_autotune_configs(kind: str):
    """Candidates of each topk_align kernel ("logits", "dw", "scatter") under
    `ALIGN_TI_AUTOTUNE=1` (each fits an H100's shared memory in fp32); imports triton lazily."""
    import triton

    if kind == "logits":
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                for m, n, k, w, st in ((64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
                                       (128, 256, 32, 8, 3), (64, 256, 32, 4, 4))]
    if kind == "dw":
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_R": r}, num_warps=w, num_stages=st)
                for n, k, r, w, st in ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3),
                                       (128, 128, 64, 8, 3), (64, 128, 64, 4, 4))]
    return [triton.Config({"BLOCK_H": h}, num_warps=w) for h, w in ((256, 2), (512, 4), (1024, 4), (2048, 8))]
