"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``): SigLIP-style
vision transformer + pixel-shuffle connector + a Llama decoder (SmolLM2 for SmolVLM), with image splitting.

The Pil image processor resizes each image and splits it into ``rows × cols`` tiles of ``max_image_size`` plus a
global view (no split for small images). The prompt text follows the HF processor exactly: per tile
``<fake_token_around_image><row_r_col_c>`` + ``image_seq_len`` image tokens, a newline after each tile row, then
``\\n<fake_token_around_image><global-img>`` + image tokens + ``<fake_token_around_image>`` (only the last part for
an unsplit image). Token groups: ``image.N.tile.R_C`` and ``image.N.global`` for the image tokens, ``image.N`` and
``image`` for all of them; the tags and newlines between them are the group ``image_tags``. The encoder reproduces
``Idefics3Model.get_image_features``: the patch mask from ``pixel_attention_mask``, the vision transformer's last
hidden state, the connector (pixel shuffle by ``scale_factor``, then the projection).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._types import Float
from ..errors import ImageTokenMismatchError
from ..prompts import ChatTemplate
from .base import Adapter, ImageGrid, register_adapter

TAGS = "image_tags"
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


@register_adapter
class Idefics3Adapter(Adapter):
    hf_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        super().__init__()
        cfg = hf_model.config
        self.vision_model = hf_model.model.vision_model
        self.connector = hf_model.model.connector
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        vc = cfg.vision_config
        self.image_size, self.patch_size, self.scale = int(vc.image_size), int(vc.patch_size), int(cfg.scale_factor)
        self.side = self.image_size // self.patch_size // self.scale
        self.image_seq_len = self.side ** 2
        for t in (FAKE, GLOBAL, "<row_1_col_1>"):
            if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id):
                raise ImageTokenMismatchError(f"The tokenizer has no {t!r} token ({type(hf_model).__name__} tags every "
                                              "image tile with it); use the checkpoint's own tokenizer.")
        self.image_processor = image_processor or self.default_image_processor()

    @staticmethod
    def language_model(hf_model: nn.Module) -> tuple[nn.Module, nn.Module]:
        return hf_model.model.text_model, hf_model.lm_head

    def default_image_processor(self) -> Any:
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        return Idefics3ImageProcessorPil(do_image_splitting=True, max_image_size={"longest_edge": self.image_size},
                                         size={"longest_edge": 4 * self.image_size})

    def default_template(self) -> ChatTemplate:
        return ChatTemplate(system="", user_prefix="<|im_start|>User:", sep=" ", image_sep="",
                            assistant_prefix="<end_of_utterance>\nAssistant:")

    @property
    def native_image_size(self) -> int | None:
        return self.image_size

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        return ImageGrid(self.side, self.side, part="global")  # the global view: the whole image

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> Any:
        return self._denormalize(model_inputs["pixel_values"][k][-1])

    def process_images(self, images: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        """-> ``({"pixel_values": [tiles_i, 3, S, S], "pixel_attention_mask": [tiles_i, S, S]} per image, per image
        its token layout)``; tiles in HF's order (row-major, the global view last)."""
        if any(isinstance(im, Tensor) for im in images):
            raise ImageTokenMismatchError("Idefics3/SmolVLM split images by their size: pass PIL images.")
        out = self.image_processor(images=[[im] for im in images], return_tensors="pt", return_row_col_info=True)
        pv, pam = out["pixel_values"], out.get("pixel_attention_mask")
        tiles, masks, layouts = [], [], []
        for k in range(len(images)):
            rows, cols = int(out["rows"][k][0]), int(out["cols"][k][0])
            n = rows * cols + 1 if rows or cols else 1
            if tuple(pv.shape[-2:]) != (self.image_size, self.image_size):
                raise ImageTokenMismatchError(f"Tiles of {tuple(pv.shape[-2:])} pixels; the vision model expects "
                                              f"{self.image_size}. Give the image processor max_image_size "
                                              f"{{'longest_edge': {self.image_size}}}.")
            tiles.append(pv[k, :n])
            masks.append(pam[k, :n] if pam is not None else torch.ones(n, *pv.shape[-2:], dtype=torch.bool))
            layout: list[tuple[str, Any]] = []
            for r in range(rows):
                for c in range(cols):
                    layout += [(TAGS, f"{FAKE}<row_{r + 1}_col_{c + 1}>"),
                               (f"tile.{r + 1}_{c + 1}", self.image_seq_len)]
                layout.append((TAGS, "\n"))
            layout += [(TAGS, ("\n" if rows or cols else "") + f"{FAKE}{GLOBAL}"), ("global", self.image_seq_len),
                       (TAGS, FAKE)]
            layouts.append(layout)
        return {"pixel_values": tiles, "pixel_attention_mask": masks}, layouts

    def encode_images(self, pixel_values: Any, pixel_attention_mask: Any = None, **_: Any
                      ) -> Float[Tensor, "img_tok d_model"]:
        pv = torch.cat(list(pixel_values)).to(device=self.device, dtype=next(self.vision_model.parameters()).dtype)
        pam = (torch.cat(list(pixel_attention_mask)).to(pv.device) if pixel_attention_mask is not None
               else torch.ones(pv.shape[0], *pv.shape[-2:], dtype=torch.bool, device=pv.device))
        p = self.patch_size
        patch_mask = pam.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0  # [tiles, side, side] (as HF)
        hidden = self.vision_model(pixel_values=pv, patch_attention_mask=patch_mask, return_dict=True
                                   ).last_hidden_state
        feats = self.connector(hidden)  # [tiles, image_seq_len, d_model]
        return feats.reshape(-1, feats.shape[-1])
