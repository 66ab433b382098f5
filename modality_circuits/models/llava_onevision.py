"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP vision tower + MLP projector + Qwen2, with
"anyres_max" images.

As LLaVA-NeXT (:mod:`~modality_circuits.models.llava_next`: base tile, tile grid unpadded, ``image_newline`` after
each row, groups ``image.N.base`` / ``grid`` / ``newline``), with OneVision's two differences, both reproduced from
``LlavaOnevisionModel``: the unpadded grid is shrunk by bilinear interpolation when it holds more than
``vision_aspect_ratio`` (``anyres_max_9``: 9 tiles' worth of) tokens, and an image of a prompt with several images
is not tiled (its base tile and one newline token only), so the token layout depends on how many images each prompt
has (the processor is told, through ``batch_num_images``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import register_adapter
from .llava_next import LlavaNextAdapter

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    hf_classes = ("LlavaOnevisionForConditionalGeneration",)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        cfg = hf_model.config
        if getattr(cfg, "image_token_id", None) is None:  # OneVision's config names it image_token_index
            cfg.image_token_id = cfg.image_token_index
        self.vision_aspect_ratio = str(cfg.vision_aspect_ratio)
        if not self.vision_aspect_ratio.startswith("anyres_max_"):
            from ..errors import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(f"vision_aspect_ratio={self.vision_aspect_ratio!r} is refused: HF's "
                                               "OneVision packing reads the maximum tile count from 'anyres_max_K'.")
        super().__init__(hf_model, tokenizer, image_processor)

    def default_image_processor(self, size: int) -> Any:  # type: ignore[override]
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                               image_grid_pinpoints=self.grid_pinpoints, image_mean=SIGLIP_MEAN,
                                               image_std=SIGLIP_STD)

    def _tiles(self, images: list[Any], images_per_prompt: list[int] | None) -> tuple[list[Tensor], Tensor]:
        """Tiles per image; an image of a prompt with several images gets its base tile only (as HF)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [c for c in (images_per_prompt or [1] * len(images)) if c]
        nested, k = [], 0
        for c in counts:
            nested.append(list(images[k:k + c]))
            k += c
        out = self.image_processor(images=nested, return_tensors="pt")
        sizes = torch.as_tensor(out["image_sizes"]).reshape(len(images), 2)
        patched = [c == 1 for c in counts for _ in range(c)]
        n_tiles = [image_size_to_num_patches(s, self.grid_pinpoints, self.image_size) if p else 1
                   for s, p in zip(sizes.tolist(), patched)]
        return [pv[:n] for pv, n in zip(out["pixel_values"], n_tiles)], sizes

    def _shrink(self, grid: Tensor) -> Tensor:
        """``LlavaOnevisionModel.pack_image_features``'s step after unpadding: a grid of more than
        ``anyres_max_K`` tiles' worth of tokens is shrunk by bilinear interpolation (as HF, same arithmetic)."""
        max_tiles = int(self.vision_aspect_ratio.removeprefix("anyres_max_"))
        _, h, w = grid.shape
        ratio = math.sqrt(h * w / (max_tiles * self.side ** 2))
        if ratio > 1.1:
            grid = nn.functional.interpolate(grid[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
        return grid
