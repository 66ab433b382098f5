"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP vision tower + average-pool / Gemma-RMSNorm projector + the
Gemma 3 decoder (converted by :mod:`~modality_circuits.models.decoders`: ``1 + w`` norms, sandwich norms, q/k norms,
scaled embeddings, per-layer-type rotary, sliding windows, soft-capping where configured).

**Bidirectional image attention.** HF lets the tokens of one image attend to each other in both directions, but
only when ``token_type_ids`` are passed (without them it silently uses a causal mask). Here the blocks are part of
the HookedTransformer's own mask: every block's attention class is switched to :func:`block_mask_attention_class`,
whose ``apply_causal_mask`` allows ``causal OR same-block`` (then the sliding window, then padding), exactly HF's
``create_masks_for_vision_model``. The blocks are the runs of image tokens (what HF derives from
``token_type_ids``), computed from the tokens; interventions on ``hook_attn_scores`` (knockout) act after this
mask, so they compose with it. A cached prefix never ends inside a block (:meth:`HookedMLLM.prefix_boundary`).

Prompt layout as the HF processor writes it: each image is ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image``
image tokens + ``<end_of_image>\\n\\n`` (group ``image.N``, the tags group ``image_tags``). With pan-and-scan the
processor adds crops: ``Here is the original image … and here are some crops to help you see better …`` with one
block per view (groups ``image.N.original``, ``image.N.crop.K``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.components.abstract_attention import AbstractAttention

from .._types import Float, Int
from ..errors import ImageTokenMismatchError
from ..interventions.core import align_rows
from ..prompts import ChatTemplate
from .base import Adapter, ImageGrid, register_adapter
from .forward_state import current
from .rope import RopeSpec

TAGS = "image_tags"
BOI, EOI = "<start_of_image>", "<end_of_image>"


def image_blocks(is_image: Tensor) -> Int[Tensor, "batch pos"]:
    """Block id of every position: consecutive image tokens form one block (numbered per row from 0), ``-1``
    elsewhere (HF's ``get_block_sequence_ids_for_mask``)."""
    prev = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    ids = torch.cumsum((is_image & ~prev).int(), dim=1) - 1
    return torch.where(is_image, ids, -1)


def _block_apply_causal_mask(self: Any, attn_scores: Float[Tensor, "batch head q_pos k_pos"],
                             past_kv_pos_offset: int = 0, attention_mask: Tensor | None = None) -> Tensor:
    """``apply_causal_mask`` with bidirectional blocks: allowed = (causal OR same block) AND window AND padding."""
    blocks = current().attention_blocks
    if blocks is None:
        return AbstractAttention.apply_causal_mask(self, attn_scores, past_kv_pos_offset, attention_mask)
    n, _, q, k = attn_scores.shape
    dev = attn_scores.device
    b = align_rows(blocks.to(dev), n)
    if b.shape[1] < k:  # positions after the prompt (generated tokens) are in no block
        b = torch.nn.functional.pad(b, (0, k - b.shape[1]), value=-1)
    qb, kb = b[:, past_kv_pos_offset:past_kv_pos_offset + q], b[:, :k]
    qpos = torch.arange(past_kv_pos_offset, past_kv_pos_offset + q, device=dev)
    kpos = torch.arange(k, device=dev)
    allowed = (kpos[None, :] <= qpos[:, None])[None] | ((qb[:, :, None] == kb[:, None, :]) & (qb[:, :, None] >= 0))
    if self.attn_type == "local":
        allowed = allowed & (kpos[None, :] > qpos[:, None] - self.cfg.window_size)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(dev).bool()[:, None, :]
    return torch.where(allowed[:, None], attn_scores, self.IGNORE.to(dev))


_BLOCK_CLASSES: dict[type, type] = {}


def block_mask_attention_class(cls: type) -> type:
    """``cls`` (a TransformerLens attention class) whose mask lets the prompt's attention blocks
    (:attr:`ForwardState.attention_blocks`) attend both ways. One subclass per class; built blocks switch to it."""
    if cls not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[cls] = type(f"BlockMask{cls.__name__}", (cls,), {
            "apply_causal_mask": _block_apply_causal_mask, "__module__": __name__})
    return _BLOCK_CLASSES[cls]


@register_adapter
class Gemma3Adapter(Adapter):
    hf_classes = ("Gemma3ForConditionalGeneration",)
    bidirectional_images = True

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        super().__init__()
        cfg = hf_model.config
        self.vision_tower = hf_model.model.vision_tower
        self.multi_modal_projector = hf_model.model.multi_modal_projector
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        for field, tag in (("boi_token_index", BOI), ("eoi_token_index", EOI)):
            tid = tokenizer.convert_tokens_to_ids(tag)
            if tid in (None, tokenizer.unk_token_id) or tid != int(getattr(cfg, field)):
                raise ImageTokenMismatchError(
                    f"The tokenizer's {tag!r} is id {tid}, the config's {field} is {getattr(cfg, field)}; Gemma 3 "
                    "wraps every image in these tokens: use the checkpoint's own tokenizer.")
        self.image_size = int(cfg.vision_config.image_size)
        self.tokens_per_image = int(cfg.mm_tokens_per_image)
        self.side = int(self.tokens_per_image ** 0.5)
        self.image_processor = image_processor or self.default_image_processor()

    @property
    def template_placeholder(self) -> str:
        """What the checkpoint's chat template writes for an image (the processor expands it)."""
        return BOI

    def default_image_processor(self) -> Any:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        return Gemma3ImageProcessorPil(size={"height": self.image_size, "width": self.image_size})

    def default_template(self) -> ChatTemplate:
        return ChatTemplate(system="", user_prefix="<start_of_turn>user\n", sep=" ", image_sep="",
                            assistant_prefix="<end_of_turn>\n<start_of_turn>model\n")

    @property
    def native_image_size(self) -> int | None:
        return self.image_size

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        crops = int(model_inputs["num_crops"][k])
        return ImageGrid(self.side, self.side, part="original" if crops else None)

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> Any:
        return self._denormalize(model_inputs["pixel_values"][k][0])

    # ------------------------------------------------------------------- images
    def _view(self, name: str) -> list[tuple[str, Any]]:
        return [(TAGS, f"\n\n{BOI}"), (name, self.tokens_per_image), (TAGS, f"{EOI}\n\n")]

    def process_images(self, images: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        """-> ``({"pixel_values": [views_i, 3, S, S] per image, "num_crops": [n_images]}, per image its layout)``;
        views in HF's order (the original, then its pan-and-scan crops)."""
        if any(isinstance(im, Tensor) for im in images):
            raise ImageTokenMismatchError("Gemma 3 images go through its image processor: pass PIL images.")
        out = self.image_processor(images=list(images), return_tensors="pt")
        crops = [int(c) for c in out["num_crops"]]
        pv = list(torch.split(out["pixel_values"], [1 + c for c in crops]))
        layouts: list[Any] = []
        for c in crops:
            if not c:
                layouts.append(self._view(""))
                continue
            lay = [(TAGS, "Here is the original image "), *self._view("original"),
                   (TAGS, " and here are some crops to help you see better ")]
            for j in range(c):
                lay += ([(TAGS, " ")] if j else []) + self._view(f"crop.{j + 1}")
            layouts.append(lay)
        return {"pixel_values": pv, "num_crops": torch.tensor(crops)}, layouts

    def encode_images(self, pixel_values: Any, **_: Any) -> Float[Tensor, "img_tok d_model"]:
        pv = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
        pv = pv.to(device=self.device, dtype=next(self.vision_tower.parameters()).dtype)
        hidden = self.vision_tower(pixel_values=pv, return_dict=True).last_hidden_state
        feats = self.multi_modal_projector(hidden)  # [views, tokens_per_image, d_model]
        return feats.reshape(-1, feats.shape[-1])

    # ---------------------------------------------------------------- attention
    def install(self, model: nn.Module, rope: RopeSpec | tuple[RopeSpec, ...] | None) -> None:
        super().install(model, rope)  # HF's rotary tables, one spec per layer type
        for block in model.blocks:
            block.attn.__class__ = block_mask_attention_class(type(block.attn))

    def attention_blocks(self, tokens: Tensor, attention_mask: Tensor, model_inputs: dict[str, Any]) -> Tensor:
        """The runs of image tokens. Inputs from :meth:`process_images` (``model.prepare``) are trusted; HF-style
        inputs must carry ``token_type_ids`` (HF silently falls back to a causal mask without them, so a call
        without them is ambiguous and refused) that agree with the image tokens."""
        is_img = tokens == self.image_token_id
        tt = model_inputs.get("token_type_ids")
        if tt is None and bool(is_img.any()) and "num_crops" not in model_inputs:
            raise ImageTokenMismatchError(
                "Gemma 3 image tokens attend to each other both ways, which HF applies only when token_type_ids are "
                "passed (without them it silently uses a causal mask, which is not how the model was trained). Pass "
                "token_type_ids=(tokens == image_token_id).long() with the pixel values, or build the batch with "
                "model.prepare(...).")
        if tt is not None and not torch.equal(tt.to(tokens.device).bool(), is_img):
            raise ImageTokenMismatchError("token_type_ids disagrees with the image-token positions of the prompt.")
        return image_blocks(is_img)
