"""InternVL (`InternVLForConditionalGeneration`, the transformers-native InternVL3 format): InternViT,
pixel shuffle (``downsample_ratio`` 0.5: a 2 x 2 block of patch features becomes one token), an MLP
projector and a Qwen2.5 language model. An image is cut into up to ``max_patches`` tiles of the
tower's size plus a thumbnail (``pixel_values`` [num_tiles, C, H, W], the tiles of all images of
a batch together); ``<IMG_CONTEXT>`` in the text becomes ``<img>``, ``image_seq_length``
``<IMG_CONTEXT>`` per tile and ``</img>``. The vision tokens are the ``<IMG_CONTEXT>`` positions.
Position ids are the plain [B, L] ones. The processor needs torchvision."""
from __future__ import annotations

from align_ti.models.families import Family, register

START, END, CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = (START, END, CONTEXT, VIDEO)
#: Tiny tiles: 32 x 32 pixels, 8-pixel patches, 4 x 4 features -> 2 x 2 tokens after pixel
#: shuffle; at most 4 tiles + thumbnail (the real model: 448-pixel tiles, 14-pixel patches,
#: 256 tokens per tile, up to 12 tiles).
TILE, TILE_PATCH, MAX_TILES = 32, 8, 4


class InternVL(Family):
    name, title = "internvl", "InternVL"
    model_types = ("internvl",)
    processor_classes = ("InternVLProcessor",)
    needs_torchvision = True

    def model_class(self):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def tokenizer(self):
        from align_ti.models.tokenizer import build_tokenizer, make_chat_template

        return build_tokenizer(SPECIAL_TOKENS, {"start_image_token": START, "end_image_token": END,
                                                "context_image_token": CONTEXT, "video_token": VIDEO},
                               chat_template=make_chat_template(f"{CONTEXT}\n"))

    def tiny_config(self, size: str, **overrides):
        from transformers import InternVLConfig

        from align_ti.models.tiny import VISION_SIZES, tiny_text_config

        vision = VISION_SIZES[size]
        tokens_per_tile = (TILE // TILE_PATCH) ** 2 // 4  # pixel shuffle 0.5
        return InternVLConfig(
            vision_config=dict(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                               num_hidden_layers=vision["num_hidden_layers"],
                               num_attention_heads=vision["num_attention_heads"], image_size=TILE,
                               patch_size=TILE_PATCH),
            text_config=tiny_text_config(size, "qwen2", **overrides),
            image_token_id=self.tokenizer().convert_tokens_to_ids(CONTEXT), image_seq_length=tokens_per_tile,
            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
            tie_word_embeddings=False)

    def tiny_processor(self, config, **image_processor_args):
        from transformers import GotOcr2ImageProcessor, InternVLProcessor
        from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

        side = config.vision_config.image_size
        side = side[0] if isinstance(side, (list, tuple)) else side
        kw = dict(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES,
                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        kw.update(image_processor_args)
        tokenizer = self.tokenizer()
        return InternVLProcessor(image_processor=GotOcr2ImageProcessor(**kw), tokenizer=tokenizer,
                                 video_processor=InternVLVideoProcessor(size={"height": side, "width": side}),
                                 image_seq_length=config.image_seq_length, chat_template=tokenizer.chat_template)


register(InternVL())
