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

    def _pack(self, feats: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
        """``LlavaOnevisionModel.pack_image_features``: per image ``[tiles, side², d]`` -> ``[tokens, d]``."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        max_tiles = int(self.vision_aspect_ratio.removeprefix("anyres_max_"))
        out = []
        for k, f in enumerate(feats):
            if f.shape[0] > 1:
                base, f = f[0], f[1:]
                rows, cols = get_anyres_image_grid_shape(image_sizes[k], self.grid_pinpoints, self.image_size)
                f = f.view(rows, cols, self.side, self.side, -1).permute(4, 0, 2, 1, 3).contiguous()
                f = unpad_image(f.flatten(1, 2).flatten(2, 3), image_sizes[k])  # [d, height, width]
                _, h, w = f.shape
                ratio = math.sqrt(h * w / (max_tiles * self.side ** 2))
                if ratio > 1.1:  # too many tokens: shrink the grid
                    f = nn.functional.interpolate(f[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
                f = torch.cat((f, newline[:, None, None].expand(*f.shape[:-1], 1).to(f.device, f.dtype)), dim=-1)
                f = torch.cat((base, f.flatten(1, 2).transpose(0, 1)), dim=0)
            else:
                f = torch.cat((f[0], newline[None].to(f)), dim=0)
            out.append(f)
        return out
