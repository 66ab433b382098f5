"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-style vision tower + MLP projector + Llama/Mistral/Qwen2.

The image encoder reproduces ``LlavaModel.get_image_features`` (transformers 5.x): hidden states of
``vision_feature_layer`` (an int, or a list concatenated on the feature axis), CLS dropped for the
``"default"`` strategy, then the projector. Each image gives ``(image_size // patch_size)**2`` tokens
(+1 for ``"full"``), which the prompt builder writes as that many ``<image>`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._types import Float
from ..errors import ImageTokenMismatchError
from ..prompts import ChatTemplate
from .base import Adapter, ImageGrid, register_adapter

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: The system prompt of LLaVA-1.5's ``vicuna_v1`` conversation template.
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions. ")


def _side(size: Any) -> int:
    """A square size given as an int or as ``[height, width]`` (InternViT's configs)."""
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@register_adapter
class LlavaAdapter(Adapter):
    hf_classes = ("LlavaForConditionalGeneration",)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        super().__init__()
        cfg = hf_model.config
        self.vision_tower = hf_model.model.vision_tower
        self.multi_modal_projector = hf_model.model.multi_modal_projector
        self.vision_feature_layer = cfg.vision_feature_layer
        self.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        vc = cfg.vision_config
        self.image_size, self.patch_size = _side(vc.image_size), _side(vc.patch_size)
        self.tokens_per_image = (self.image_size // self.patch_size) ** 2 + (
            1 if self.vision_feature_select_strategy == "full" else 0)
        self.image_processor = image_processor or self.default_image_processor(self.image_size)

    @staticmethod
    def default_image_processor(size: int) -> Any:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     image_mean=CLIP_MEAN, image_std=CLIP_STD)

    def default_template(self) -> ChatTemplate:
        return ChatTemplate(system=LLAVA_SYSTEM, user_prefix="USER: ", sep="\n", image_sep="\n",
                            assistant_prefix=" ASSISTANT:")

    @property
    def native_image_size(self) -> int | None:
        return self.image_size

    @property
    def fixed_tokens_per_image(self) -> int | None:
        return self.tokens_per_image

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        side = self.image_size // self.patch_size
        return ImageGrid(side, side, has_cls=self.vision_feature_select_strategy == "full")

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> Any:
        return self._denormalize(model_inputs["pixel_values"][k])

    def process_images(self, images: list[Any]) -> tuple[dict[str, Any], list[int]]:
        tensors = [im for im in images if isinstance(im, Tensor)]
        if tensors and len(tensors) != len(images):
            raise ImageTokenMismatchError("Pass images either all as PIL images or all as pixel tensors [C, H, W].")
        if tensors:
            pv = torch.stack([t if t.dim() == 3 else t.squeeze(0) for t in tensors])
        else:
            pv = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        expect = (3, self.image_size, self.image_size)
        if tuple(pv.shape[1:]) != expect:
            raise ImageTokenMismatchError(
                f"Pixel tensors have shape {tuple(pv.shape[1:])}, the vision tower expects {expect}. "
                "Pass PIL images (the image processor resizes them) or tensors of the right size.")
        return {"pixel_values": pv}, [self.tokens_per_image] * len(images)

    def encode_images(self, pixel_values: Tensor, **_: Any) -> Float[Tensor, "img_tok d_model"]:
        pixel_values = pixel_values.to(device=self.device, dtype=next(self.vision_tower.parameters()).dtype)
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        feats = [out.hidden_states[i] for i in layers]  # each [n_images, 1 + img_pos, d_vision]
        if self.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        feats = torch.cat(feats, dim=-1)
        proj = self.multi_modal_projector(feats)  # [n_images, img_pos, d_model]
        return proj.reshape(-1, proj.shape[-1])
