"""Random-weight model pairs of real distillation shapes, for benchmarks (not for training).

`qwen2_5_vl_pair(divisor)`: a Qwen2.5-VL-7B-shaped teacher and a Qwen2.5-VL-3B-shaped student
(the unequal-vocabulary pair: 152064 and 151936 LM-head rows) at full scale (``divisor=1``) or
with every width, both vocabularies and the sequence, vision and instruction lengths divided by
``divisor`` (layer and head counts kept, so the cost shares of body, heads and attention stay
those of the full pair, as in the LLaVA case of `benchmarks/train_step.py`);
`qwen2_5_vl_batch(meta)` a seeded training batch for it:
``[prefix 2][<|vision_start|>][n_vision image tokens][<|vision_end|>][instruction][response]``
with its ``pixel_values`` and ``image_grid_thw``. `DistillModule` takes the batch as it is (its
family adapter computes the 3-D position ids); a forward outside it needs them too:
``get_family("qwen2_5_vl").position_ids(model, input_ids, attention_mask, images)``.

APPROXIMATION: the vision tower is one narrow block (hidden 64) with the real patch (14), merge
(2) and temporal patch (2) sizes, so it produces the real number of image tokens (729 at full
scale: a 54 x 54 patch grid) at a fraction of the 675M-parameter tower's cost.
"""
from __future__ import annotations

import torch

from align_ti.constants import IGNORE_INDEX

__all__ = ["qwen2_5_vl_configs", "qwen2_5_vl_pair", "qwen2_5_vl_batch"]

#: Qwen2.5-VL-7B-Instruct's and -3B-Instruct's language models (their config.json files).
TEACHER_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4)
STUDENT_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2)
HEAD_DIM = 128


def qwen2_5_vl_configs(divisor: int = 1, num_layers: int | None = None):
    """``(student_config, teacher_config, meta)``; ``meta`` holds what `qwen2_5_vl_batch` and a
    benchmark need (token ids, lengths, the IVA layer). ``num_layers``: None for the real depths
    (28 and 36 decoder layers), or that many in both (a quick check of the plumbing)."""
    from transformers import Qwen2_5_VLConfig

    from align_ti.models.families.qwen_vl import QwenVLFamily

    if isinstance(divisor, bool) or not isinstance(divisor, int) or not 1 <= divisor <= 16:
        raise ValueError(f"divisor must be an int in [1, 16] (head_dim 128 / divisor >= 8), got {divisor!r}")
    vocab = STUDENT_3B["vocab_size"] // divisor
    # Qwen2.5-VL's special ids sit above the text vocabulary (151643 ...); reduced, just below the
    # smaller vocabulary
    pad_id, start_id, end_id, video_id, image_id, eos_id = (151643, 151652, 151653, 151656, 151655, 151645) \
        if divisor == 1 else tuple(range(vocab - 6, vocab))
    n_side = max(2, int((729 / divisor) ** 0.5))  # merged grid: 27 x 27 image tokens at full scale
    n_vision = n_side * n_side
    head_dim = HEAD_DIM // divisor

    def config(text: dict):
        text = {k: (v // divisor if k in ("vocab_size", "hidden_size", "intermediate_size") else v)
                for k, v in text.items()}
        if num_layers is not None:
            text["num_hidden_layers"] = num_layers
        text.update(head_dim=head_dim, max_position_embeddings=32768, rms_norm_eps=1e-6, pad_token_id=pad_id,
                    eos_token_id=eos_id, bos_token_id=None, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": QwenVLFamily._mrope_section(head_dim // 2)})
        vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=text["hidden_size"],
                      window_size=112, fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image_id,
                                video_token_id=video_id,
                                vision_start_token_id=start_id, vision_end_token_id=end_id)

    length = 2048 if divisor == 1 else round(n_vision * 2048 / 729)
    meta = dict(family="qwen2_5_vl", image_token_id=image_id, vision_start_id=start_id, vision_end_id=end_id,
                pad_id=pad_id, batch=2, length=length, n_vision=n_vision, grid=2 * n_side,
                n_instruction=max(1, 32 // divisor), iva_layer=14 if num_layers is None else num_layers // 2,
                token_low=1000 // divisor,
                token_high=150000 // divisor, divisor=divisor)
    return config(STUDENT_3B), config(TEACHER_7B), meta


def qwen2_5_vl_pair(divisor: int = 1, device="cpu", dtype: torch.dtype = torch.float32,
                    attn_implementation="sdpa", num_layers: int | None = None):
    """``(student, teacher, meta)`` of `qwen2_5_vl_configs`: the student in train mode, the teacher
    frozen in eval mode, both built on ``device`` (a 7B-shaped random init takes tens of seconds on
    a CPU) with seeds 0 / 1."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    s_cfg, t_cfg, meta = qwen2_5_vl_configs(divisor, num_layers)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        student = Qwen2_5_VLForConditionalGeneration._from_config(s_cfg, attn_implementation=attn_implementation,
                                                                  dtype=dtype)
        torch.manual_seed(1)
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(t_cfg, attn_implementation=attn_implementation,
                                                                  dtype=dtype)
    student.train()
    teacher.eval().requires_grad_(False)
    return student, teacher, meta


def qwen2_5_vl_batch(meta: dict, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """A seeded batch of ``meta["batch"]`` samples of ``meta["length"]`` tokens (see the module
    docstring), labels on the response, the instruction mask, one image of ``grid x grid``
    patches per sample."""
    g = torch.Generator().manual_seed(1234)
    b, length, nv, grid = meta["batch"], meta["length"], meta["n_vision"], meta["grid"]
    ids = torch.randint(meta["token_low"], meta["token_high"], (b, length), generator=g)
    ids[:, 2] = meta["vision_start_id"]
    ids[:, 3:3 + nv] = meta["image_token_id"]
    ids[:, 3 + nv] = meta["vision_end_id"]
    instr_end = 4 + nv + meta["n_instruction"]
    instruction_mask = torch.zeros(b, length, dtype=torch.bool)
    instruction_mask[:, 4 + nv:instr_end] = True
    labels = ids.clone()
    labels[:, :instr_end] = IGNORE_INDEX
    pixel_values = torch.randn(b * grid * grid, 3 * 2 * 14 * 14, generator=g)  # C x T x P x P per patch
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones(b, length, dtype=torch.long, device=device),
        "labels": labels.to(device), "instruction_mask": instruction_mask.to(device),
        "pixel_values": pixel_values.to(device, dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * b, device=device),
    }
