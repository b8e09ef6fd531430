"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution and multimodal RoPE.

- Images: the processor turns each image into ``grid_t x grid_h x grid_w`` patches (its
  ``min_pixels`` / ``max_pixels`` decide the grid), flattened into ``pixel_values``
  [num_patches, C * T * P * P] rows of all images of a batch together, and ``image_grid_thw``
  [num_images, 3]; ``<|vision_start|><|image_pad|><|vision_end|>`` in the text becomes one
  ``<|image_pad|>`` per ``spatial_merge_size ** 2`` patches. The vision tokens are the
  ``<|image_pad|>`` positions (not the start / end markers).
- Position ids are 3-D, [3, B, L] (temporal, height, width), from the model's own
  ``get_rope_index`` over the image grids. Without explicit position ids the model would compute
  them from ``mm_token_type_ids`` (and, with a cache, from a ``rope_deltas`` it keeps between
  calls, which goes stale), so every forward here passes them: a TPA candidate takes y_t's ids
  in all three components.
- Qwen3-VL also adds vision features into the first decoder layers (DeepStack) at the image-token
  positions; candidates are never image tokens, so they get none.
- The processors need torchvision (their video processors import it).
"""
from __future__ import annotations

import torch

from align_ti.models.families import Family, register

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
#: The family's special tokens in the tiny tokenizer (appended after its words, in this order).
SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
#: Modelled on the Qwen2-VL / 2.5-VL / 3-VL chat templates: a default system turn, and each image
#: as <|vision_start|><|image_pad|><|vision_end|> where it stands in the user turn.
SYSTEM_PROMPT = "You are a helpful assistant."


class QwenVLFamily(Family):
    image_inputs = ("pixel_values", "image_grid_thw")
    needs_torchvision = True
    multimodal_rope = True
    # tiny models: the real patch size (Qwen3-VL: 16), merge 2 and temporal patch 2; the
    # processor's pixel bounds make a 48 x 48 image a 6 x 6 patch grid (9 image tokens)
    patch_size = 14

    def vision_tower(self, model) -> list:
        return [model.model.visual]

    def projector(self, model) -> list:
        return [model.model.visual.merger]

    def position_ids(self, model, input_ids, attention_mask, images) -> torch.Tensor:
        """[3, B, L] from the model's own ``get_rope_index``: text tokens count up in all three
        components, an image's tokens take (t, row, column) of its merged patch grid. Padding gets
        0 (it is never attended to)."""
        mm_token_type_ids = self.vision_mask(model.config, input_ids).to(torch.int32)  # 1 = image, 0 = text
        positions, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=images.get("image_grid_thw"),
            attention_mask=attention_mask)
        return positions

    # ---- tiny models -------------------------------------------------------------------------
    def _text(self, size: str, **overrides) -> dict:
        from align_ti.models.tiny import text_kwargs

        kw = text_kwargs(size, **overrides)
        half = kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"]) // 2
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": self._mrope_section(half)}
        return kw

    @staticmethod
    def _mrope_section(half: int) -> list[int]:
        """Qwen2-VL's [16, 24, 24] of 64 rotary pairs, scaled to ``half`` pairs."""
        t = half // 4
        return [t, (half - t + 1) // 2, (half - t) // 2]

    def _token_ids(self, tokenizer) -> dict:
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        return dict(vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
                    video_token_id=ids[3])

    def tokenizer(self):
        from align_ti.models.tokenizer import build_tokenizer, make_chat_template

        template = make_chat_template(f"{VISION_START}{IMAGE_PAD}{VISION_END}", system_prompt=SYSTEM_PROMPT)
        return build_tokenizer(SPECIAL_TOKENS, {"image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
                                                "vision_start_token": VISION_START, "vision_end_token": VISION_END},
                               chat_template=template)

    def tiny_config(self, size: str, **overrides):
        from align_ti.models.tiny import VISION_SIZES

        vision = VISION_SIZES[size]
        text = self._text(size, **overrides)
        return self._config(vision, text, self._token_ids(self.tokenizer()))

    def tiny_processor(self, config, **image_processor_args):
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        vision = config.vision_config
        side = 3 * vision.patch_size * vision.spatial_merge_size  # 6 x 6 patches: 9 image tokens
        kw = dict(min_pixels=side * side, max_pixels=side * side, patch_size=vision.patch_size,
                  merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size)
        kw.update(image_processor_args)
        tokenizer = self.tokenizer()
        return self._processor_class()(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                                       video_processor=self._video_processor(vision),
                                       chat_template=tokenizer.chat_template)


class Qwen2VL(QwenVLFamily):
    name, title = "qwen2_vl", "Qwen2-VL"
    model_types = ("qwen2_vl",)
    processor_classes = ("Qwen2VLProcessor",)

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _config(self, vision: dict, text: dict, ids: dict):
        from transformers import Qwen2VLConfig

        # Qwen2-VL's vision transformer: embed_dim wide, mlp_ratio 4 (here 2), a merger to the text width
        vision_config = dict(depth=vision["num_hidden_layers"], embed_dim=vision["hidden_size"],
                             num_heads=vision["num_attention_heads"], mlp_ratio=2, hidden_size=text["hidden_size"],
                             patch_size=self.patch_size, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision_config, **ids)

    def _processor_class(self):
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor

    def _video_processor(self, vision):
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                     temporal_patch_size=vision.temporal_patch_size)


class Qwen2_5_VL(Qwen2VL):
    name, title = "qwen2_5_vl", "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    processor_classes = ("Qwen2_5_VLProcessor",)

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def _config(self, vision: dict, text: dict, ids: dict):
        from transformers import Qwen2_5_VLConfig

        # Qwen2.5-VL's: SwiGLU MLP, windowed attention (112-pixel windows) with full attention in every
        # 8th block (here the last of 2), a merger to out_hidden_size
        vision_config = dict(depth=vision["num_hidden_layers"], hidden_size=vision["hidden_size"],
                             intermediate_size=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
                             out_hidden_size=text["hidden_size"], window_size=112,
                             fullatt_block_indexes=[vision["num_hidden_layers"] - 1], patch_size=self.patch_size,
                             spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision_config, **ids)

    def _processor_class(self):
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor


class Qwen3VL(QwenVLFamily):
    name, title = "qwen3_vl", "Qwen3-VL"
    model_types = ("qwen3_vl",)
    processor_classes = ("Qwen3VLProcessor",)
    patch_size = 16

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def projector(self, model) -> list:
        visual = model.model.visual
        return [visual.merger, visual.deepstack_merger_list]

    def _text(self, size: str, **overrides) -> dict:
        kw = super()._text(size, **overrides)
        kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
        # Qwen3-VL interleaves the three components over the rotary pairs ([24, 20, 20] of 64)
        half = kw["head_dim"] // 2
        t = half - 2 * (half * 5 // 16)
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                 "mrope_section": [t, half * 5 // 16, half * 5 // 16]}
        return kw

    def _config(self, vision: dict, text: dict, ids: dict):
        from transformers import Qwen3VLConfig

        # Qwen3-VL's: learned position embeddings interpolated to the grid (48 x 48 of them; here
        # 4 x 4), DeepStack features of some blocks (8, 16, 24 of 27; here the first) into the first
        # decoder layers
        vision_config = dict(depth=vision["num_hidden_layers"], hidden_size=vision["hidden_size"],
                             intermediate_size=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
                             out_hidden_size=text["hidden_size"], num_position_embeddings=16,
                             deepstack_visual_indexes=[0], patch_size=self.patch_size, spatial_merge_size=2,
                             temporal_patch_size=2)
        return Qwen3VLConfig(text_config=text, vision_config=vision_config, **ids)

    def _processor_class(self):
        from transformers import Qwen3VLProcessor

        return Qwen3VLProcessor

    def _video_processor(self, vision):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        return Qwen3VLVideoProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                     temporal_patch_size=vision.temporal_patch_size)


register(Qwen2VL())
register(Qwen2_5_VL())
register(Qwen3VL())
