"""InternVL (``InternVLForConditionalGeneration``, InternVL3 in transformers 5.x): InternViT + pixel shuffle + MLP
projector + a Qwen2 decoder, with dynamic tiling.

Each image is cut by the Pil GOT-OCR2 processor into 1 to ``max_patches`` tiles of ``image_size`` pixels on the
canvas closest to its aspect ratio, plus a thumbnail of the whole image when there is more than one tile. Every tile
gives ``(image_size / patch_size)² · downsample_ratio²`` tokens (256 for InternVL3: 448 px, 14 px patches, 0.5),
written as ``<IMG_CONTEXT>`` between ``<img>`` and ``</img>``. The encoder reproduces
``InternVLModel.get_image_features``: the vision tower's last hidden state (or ``vision_feature_layer``), CLS dropped
for the ``"default"`` strategy, pixel shuffle, projector. Token groups: ``image.N`` per image, ``image.N.tile.T``
per tile (the thumbnail is ``image.N.thumbnail``), ``image`` for all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._types import Float
from ..errors import ImageTokenMismatchError
from ..prompts import ChatTemplate
from .base import ImageGrid, register_adapter
from .llava import CLIP_MEAN, CLIP_STD, LlavaAdapter
from .qwen2_vl import QWEN_SYSTEM


def pixel_shuffle(x: Float[Tensor, "n side side d"], scale: float) -> Float[Tensor, "n side2 side2 d2"]:
    """InternVL's pixel shuffle (``InternVLModel.pixel_shuffle``, the same reshapes): ``[n, w, h, c]`` ->
    ``[n, h·s, w·s, c / s²]``."""
    n, w, h, c = x.shape
    if h % (1 / scale) or w % (1 / scale):
        raise ImageTokenMismatchError(f"The vision grid {w}x{h} is not divisible by 1/downsample_ratio = {1 / scale}.")
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale ** 2)))
    return x.permute(0, 2, 1, 3).contiguous()


@register_adapter
class InternVLAdapter(LlavaAdapter):
    """LLaVA's parts (vision tower, projector, feature layer and selection, image token), with InternViT's pixel
    shuffle and per-image tiles."""

    hf_classes = ("InternVLForConditionalGeneration",)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        super().__init__(hf_model, tokenizer, image_processor)
        self.downsample_ratio = float(hf_model.config.downsample_ratio)
        self.tile_side = int(self.image_size // self.patch_size * self.downsample_ratio)
        self.tokens_per_tile = self.tile_side ** 2
        for t in ("<img>", "</img>"):
            if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id):
                raise ImageTokenMismatchError(f"InternVL's tokenizer has no {t!r} token (it wraps every image in "
                                              "<img> … </img>); use the checkpoint's own tokenizer.")

    @property
    def fixed_tokens_per_image(self) -> int | None:
        return None  # 1-12 tiles (+ thumbnail) per image

    @staticmethod
    def default_image_processor(size: int) -> Any:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True, min_patches=1,
                                        max_patches=12, image_mean=CLIP_MEAN, image_std=CLIP_STD)

    def default_template(self) -> ChatTemplate:
        """ChatML with Qwen2's default system turn, for checkpoints without a chat template (a real InternVL
        checkpoint's own ``chat_template.json`` is read by the loader and used instead)."""
        return ChatTemplate(system=QWEN_SYSTEM, user_prefix="<|im_start|>user\n", sep="\n", image_sep="\n",
                            assistant_prefix="<|im_end|>\n<|im_start|>assistant\n", image_prefix="<img>",
                            image_suffix="</img>")

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        tiles = model_inputs["pixel_values"][k].shape[0]
        if tiles != 1:
            from ..errors import ModalityCircuitsError

            raise ModalityCircuitsError(f"Image {k} has {tiles} tiles; the attention-over-image view covers "
                                        "one-tile images only (give the image processor max_patches=1).")
        return ImageGrid(self.tile_side, self.tile_side)

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> Any:
        return self._denormalize(model_inputs["pixel_values"][k][-1])  # the thumbnail (or the only tile)

    def process_images(self, images: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        """-> ``({"pixel_values": [tiles_i, 3, S, S] per image}, per image ``[(tile name, tokens), …]``)``."""
        if any(isinstance(im, Tensor) for im in images):
            tiles = [im if im.dim() == 4 else im[None] for im in images]
        else:
            out = self.image_processor(images=list(images), return_tensors="pt")
            pv, counts = out["pixel_values"], [int(n) for n in out["num_patches"]]
            starts = [sum(counts[:i]) for i in range(len(counts))]
            tiles = [pv[s:s + n] for s, n in zip(starts, counts)]
        for t in tiles:
            if tuple(t.shape[1:]) != (3, self.image_size, self.image_size):
                raise ImageTokenMismatchError(
                    f"Tiles have shape {tuple(t.shape[1:])}, the vision tower expects "
                    f"{(3, self.image_size, self.image_size)}. Pass PIL images (the processor tiles them) or "
                    "tensors [tiles, 3, S, S].")
        return {"pixel_values": tiles}, [[(name, self.tokens_per_tile) for name in self.tile_names(t.shape[0])]
                                         for t in tiles]

    def tile_names(self, n_tiles: int) -> list[str]:
        """Group suffixes of one image's tiles, in token order: ``tile.0 …`` and ``thumbnail`` (last, when tiled)."""
        return ["tile.0"] if n_tiles == 1 else [f"tile.{t}" for t in range(n_tiles - 1)] + ["thumbnail"]

    def encode_images(self, pixel_values: Any, **_: Any) -> Float[Tensor, "img_tok d_model"]:
        pv = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
        pv = pv.to(device=self.device, dtype=next(self.vision_tower.parameters()).dtype)
        layer = self.vision_feature_layer
        out = self.vision_tower(pixel_values=pv, output_hidden_states=layer != -1, return_dict=True)
        feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]  # [tiles, 1 + pos, d_vision]
        if self.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        n, pos, d = feats.shape
        side = int(pos ** 0.5)
        feats = pixel_shuffle(feats.reshape(n, side, side, d), self.downsample_ratio)
        proj = self.multi_modal_projector(feats.reshape(n, -1, feats.shape[-1]))  # [tiles, tile_tok, d_model]
        return proj.reshape(-1, proj.shape[-1])
