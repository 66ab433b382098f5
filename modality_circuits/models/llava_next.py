"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP vision tower + MLP projector + Llama/Mistral/Qwen2, with
"anyres" images.

Each image is resized onto the best of ``image_grid_pinpoints`` and cut into tiles of the vision tower's size, plus a
base tile of the whole image (Pil ``LlavaNextImageProcessor``). The encoder reproduces
``LlavaNextModel.get_image_features`` + ``pack_image_features`` (``spatial_unpad``): the base tile's features, then
the tiles' features laid out on one grid, the padding rows/columns of the resize removed (HF's ``unpad_image``),
and the learned ``image_newline`` vector after every grid row. The token groups follow that layout:
``image.N.base``, ``image.N.grid`` and ``image.N.newline`` (one token per row), ``image.N`` and ``image`` for all.
The group layout is read off a dry run of the same packing code on marker features, so it cannot drift from the
features. A selection that does not give a full tile grid (``"full"`` on a CLIP tower, whose CLS would stay) is
refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._types import Float
from ..errors import ImageTokenMismatchError, UnsupportedArchitectureError
from .base import ImageGrid, register_adapter
from .llava import CLIP_MEAN, CLIP_STD, LlavaAdapter

_LAYOUT_NAMES = ("base", "grid", "newline")


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    hf_classes = ("LlavaNextForConditionalGeneration",)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        cfg = hf_model.config
        vc = cfg.vision_config
        has_cls = vc.model_type == "clip_vision_model"  # SigLIP towers have no CLS token
        per_tile = (vc.image_size // vc.patch_size) ** 2 + has_cls - (cfg.vision_feature_select_strategy == "default")
        if per_tile != (vc.image_size // vc.patch_size) ** 2:
            raise UnsupportedArchitectureError(
                f"{type(hf_model).__name__} with vision_feature_select_strategy="
                f"{cfg.vision_feature_select_strategy!r} on a {vc.model_type} tower is refused: HF's anyres packing "
                f"lays each tile out as a {vc.image_size // vc.patch_size}² grid, and this selection gives {per_tile} "
                "tokens per tile.")
        self.grid_pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
        super().__init__(hf_model, tokenizer, image_processor)
        self.image_newline = hf_model.model.image_newline  # [d_model], shared with the HF model
        self.side = self.image_size // self.patch_size

    def default_image_processor(self, size: int) -> Any:  # type: ignore[override]
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                          image_grid_pinpoints=self.grid_pinpoints, image_mean=CLIP_MEAN,
                                          image_std=CLIP_STD)

    @property
    def fixed_tokens_per_image(self) -> int | None:
        return None  # depends on each image's size

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        return ImageGrid(self.side, self.side, part="base")  # the base tile: the whole image at the tower's size

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> Any:
        return self._denormalize(model_inputs["pixel_values"][k][0])

    # ------------------------------------------------------------------------------------------------ images
    def _tiles(self, images: list[Any], images_per_prompt: list[int] | None) -> tuple[list[Tensor], Tensor]:
        """(per image its tiles ``[tiles, 3, S, S]``, ``image_sizes [n, 2]``) from the Pil processor."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        out = self.image_processor(images=list(images), return_tensors="pt")
        sizes = torch.as_tensor(out["image_sizes"]).reshape(len(images), 2)
        n_tiles = [image_size_to_num_patches(s, self.grid_pinpoints, self.image_size) for s in sizes.tolist()]
        return [pv[:n] for pv, n in zip(out["pixel_values"], n_tiles)], sizes

    def process_images(self, images: list[Any], images_per_prompt: list[int] | None = None
                       ) -> tuple[dict[str, Any], list[Any]]:
        """-> ``({"pixel_values": [tiles_i, 3, S, S] per image, "image_sizes": [n, 2]}, per image its token layout
        ``[(group, count), …]``)``; ``images_per_prompt``: how the images are split over the prompts."""
        if any(isinstance(im, Tensor) for im in images):
            raise ImageTokenMismatchError(f"{type(self).__name__[:-7]} needs each image's original size for its "
                                          "anyres layout: pass PIL images (the image processor tiles them).")
        tiles, sizes = self._tiles(images, images_per_prompt)
        n_tiles = [t.shape[0] for t in tiles]
        layouts = []
        for n, size in zip(n_tiles, sizes):  # dry run of the packing on markers: 0 base, 1 grid, 2 newline
            marks = torch.ones(n, self.side * self.side, 1)
            marks[0] = 0
            packed = self._pack([marks], size[None], torch.full((1,), 2.0))[0][:, 0].long().tolist()
            runs: list[tuple[str, int]] = []
            for m in packed:
                name = _LAYOUT_NAMES[m]
                runs = runs[:-1] + [(name, runs[-1][1] + 1)] if runs and runs[-1][0] == name else runs + [(name, 1)]
            layouts.append(runs)
        return {"pixel_values": tiles, "image_sizes": sizes}, layouts

    def _pack(self, feats: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
        """``LlavaNextModel.pack_image_features`` (spatial_unpad): per image ``[tiles, side², d]`` ->
        ``[tokens, d]``."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        out = []
        for k, f in enumerate(feats):
            if f.shape[0] > 1:
                base, f = f[0], f[1:]
                rows, cols = get_anyres_image_grid_shape(image_sizes[k], self.grid_pinpoints, self.image_size)
                f = f.view(rows, cols, self.side, self.side, -1).permute(4, 0, 2, 1, 3).contiguous()
                f = self._shrink(unpad_image(f.flatten(1, 2).flatten(2, 3), image_sizes[k]))  # [d, height, width]
                f = torch.cat((f, newline[:, None, None].expand(*f.shape[:-1], 1).to(f.device, f.dtype)), dim=-1)
                f = torch.cat((base, f.flatten(1, 2).transpose(0, 1)), dim=0)
            else:
                f = torch.cat((f[0], newline[None].to(f)), dim=0)
            out.append(f)
        return out

    def _shrink(self, grid: Float[Tensor, "d height width"]) -> Float[Tensor, "d height2 width2"]:
        """The unpadded grid as it is packed (LLaVA-NeXT: unchanged; OneVision shrinks large ones)."""
        return grid

    def encode_images(self, pixel_values: Any, image_sizes: Tensor, **_: Any) -> Float[Tensor, "img_tok d_model"]:
        tiles = list(pixel_values)
        pv = torch.cat(tiles).to(device=self.device, dtype=next(self.vision_tower.parameters()).dtype)
        out = self.vision_tower(pv, output_hidden_states=True, return_dict=True)
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        drop = int(self.vision_feature_select_strategy == "default")  # CLIP's CLS ("default"); SigLIP keeps all
        feats = torch.cat([out.hidden_states[i][:, drop:] for i in layers], dim=-1)
        proj = self.multi_modal_projector(feats)  # [all tiles, side², d_model]
        per_image = list(torch.split(proj, [t.shape[0] for t in tiles], dim=0))
        return torch.cat(self._pack(per_image, image_sizes.to(proj.device), self.image_newline))
