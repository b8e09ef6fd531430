"""LLaVA (`LlavaForConditionalGeneration`): a vision tower (SigLIP / CLIP), a 2-layer MLP projector
and a decoder-only language model; each ``<image>`` becomes a fixed number of image tokens (one
per patch; one fewer with ``vision_feature_select_strategy="default"``, which drops CLIP's CLS).
Position ids are the plain [B, L] ones. Its processor runs without torchvision."""
from __future__ import annotations

from align_ti.models.families import Family, register


class Llava(Family):
    name, title = "llava", "LLaVA"
    model_types = ("llava",)
    processor_classes = ("LlavaProcessor",)

    def model_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def tiny_config(self, size: str, **overrides):
        from align_ti.models.tiny import tiny_llava_config

        return tiny_llava_config(size, **overrides)

    def tiny_processor(self, config, **image_processor_args):
        from align_ti.models.tiny import build_processor

        if image_processor_args:
            raise ValueError(f"the tiny LLaVA processor takes no image-processor settings, got "
                             f"{sorted(image_processor_args)}")
        return build_processor(config=config)


register(Llava())
