"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP + a Qwen2 language model with
any-resolution tiling. An image is resized to the best of ``image_grid_pinpoints`` and cut into
tiles of the tower's size, plus one base tile of the whole image (``pixel_values``
[num_images, num_tiles, C, H, W], padded to the most tiles of a batch, and ``image_sizes``
[num_images, 2], from which the model finds each image's real tiles); the tiles' features are
unpadded to the image's aspect ratio and a learned ``image_newline`` feature ends every row.

IVA counts the row-newline tokens as vision tokens: they are ``<image>`` tokens in the sequence
(the same id; telling them apart would need the tiling arithmetic) and sit inside the image's
span, and the teacher's attention weights them like any other (a row end that the instruction
does not look at gets little weight). Position ids are the plain [B, L] ones. The processor
needs torchvision."""
from __future__ import annotations

from align_ti.models.families import Family, register

VIDEO_TOKEN = "<video>"
#: Tiny tiles: 16 x 16 pixels, 8-pixel patches (2 x 2 features each); at most 2 x 2 tiles (the
#: real model: 384-pixel tiles of 27 x 27 features, up to 6 x 6 pinpoints, anyres_max_9).
TILE, TILE_PATCH, MAX_TILES = 16, 8, 2


class LlavaOnevision(Family):
    name, title = "llava_onevision", "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    processor_classes = ("LlavaOnevisionProcessor",)
    image_inputs = ("pixel_values", "image_sizes")
    needs_torchvision = True

    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def projector(self, model) -> list:
        return [model.model.multi_modal_projector, model.model.image_newline]

    def tokenizer(self):
        from align_ti.models.tokenizer import build_tokenizer

        return build_tokenizer((VIDEO_TOKEN,), {"video_token": VIDEO_TOKEN})

    def tiny_config(self, size: str, **overrides):
        from transformers import LlavaOnevisionConfig

        from align_ti.models.tiny import tiny_text_config, tiny_vision_config

        tokenizer = self.tokenizer()
        pinpoints = [[TILE * a, TILE * b] for a in range(1, MAX_TILES + 1) for b in range(1, MAX_TILES + 1)]
        return LlavaOnevisionConfig(
            vision_config=tiny_vision_config(size, image_size=TILE, patch_size=TILE_PATCH),
            text_config=tiny_text_config(size, "qwen2", **overrides),
            image_token_index=tokenizer.image_token_id, video_token_index=tokenizer.video_token_id,
            image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
            vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)

    def tiny_processor(self, config, **image_processor_args):
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_llava_onevision import (
            LlavaOnevisionImageProcessor,
        )
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        vision = config.vision_config
        kw = dict(size={"height": vision.image_size, "width": vision.image_size},
                  image_grid_pinpoints=config.image_grid_pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        kw.update(image_processor_args)
        tokenizer = self.tokenizer()
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(**kw), tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(size={"height": vision.image_size, "width": vision.image_size}),
            num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio, chat_template=tokenizer.chat_template)


register(LlavaOnevision())
