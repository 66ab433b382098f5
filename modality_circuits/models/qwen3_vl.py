"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): ViT with learned, resampled position embeddings and a 2×2 patch
merger + a Qwen3 decoder (per-head q/k RMSNorm) with **interleaved** M-RoPE and **DeepStack**.

Everything Qwen2-VL's adapter does holds (3-D positions from ``image_grid_thw``, ``<|vision_start|>`` /
``<|image_pad|>`` / ``<|vision_end|>``, the attention applying M-RoPE itself), with two differences reproduced from
HF:

* the rotary frequencies are interleaved across ``(t, h, w)`` instead of chunked
  (:func:`~modality_circuits.models.qwen2_vl.mrope_axes`);
* the vision tower also returns one feature map per ``deepstack_visual_indexes`` entry, which HF adds to the hidden
  states at the image positions after decoder blocks ``0 … K-1``. Here each of those blocks is switched to
  :func:`deepstack_block_class`: after the block, ``blocks.k.hook_deepstack`` (``[image tokens in this pass,
  d_model]``) sees the features and the block adds what the hook returns. So DeepStack is an explicit, hookable
  injection (zero it to ablate it), and the features travel with the forward
  (:class:`~modality_circuits.models.forward_state.DeepStack`): runs from a layer or a KV cache get them from
  ``**model.prompt_context(batch)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .._types import Float
from ..interventions.core import align_rows
from .base import register_adapter
from .forward_state import current
from .qwen2_vl import Qwen2VLAdapter
from .rope import RopeSpec


def _add_deepstack(block: nn.Module, out: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """``out`` with block ``block.deepstack_index``'s DeepStack features added at the image positions of this pass."""
    ds = current().deepstack
    if ds is None:
        return out
    n, q = out.shape[:2]
    off = current().offset
    mask = ds.image_mask.to(out.device)  # [B, L] of the whole prompt
    index = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # each image position's feature row
    sel = align_rows(mask, n)[:, off:off + q]
    if not bool(sel.any()):
        return out
    rows = align_rows(index, n)[:, off:off + q][sel]
    feats = block.hook_deepstack(ds.features[block.deepstack_index].to(out.device, out.dtype)[rows])
    out = out.clone()
    out[sel] = out[sel] + feats  # as HF: hidden[mask] + features
    return out


_DEEPSTACK_CLASSES: dict[type, type] = {}


def deepstack_block_class(cls: type) -> type:
    """``cls`` (a TransformerLens block class) that adds its DeepStack features after the block (one subclass per
    class; the first ``K`` built blocks switch to it)."""
    if cls not in _DEEPSTACK_CLASSES:
        def forward(self: nn.Module, resid_pre: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return _add_deepstack(self, cls.forward(self, resid_pre, *args, **kwargs))

        _DEEPSTACK_CLASSES[cls] = type(f"DeepStack{cls.__name__}", (cls,), {"forward": forward,
                                                                             "__module__": __name__})
    return _DEEPSTACK_CLASSES[cls]


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    hf_classes = ("Qwen3VLForConditionalGeneration",)
    interleaved = True
    default_sections = (24, 20, 20)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        super().__init__(hf_model, tokenizer, image_processor)
        self.deepstack_layers = len(hf_model.config.vision_config.deepstack_visual_indexes)
        n_layers = hf_model.config.text_config.num_hidden_layers
        if self.deepstack_layers > n_layers:
            from ..errors import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"vision_config.deepstack_visual_indexes has {self.deepstack_layers} entries but the decoder has "
                f"{n_layers} layers; HF adds one feature map after each of the first decoder layers.")

    def default_image_processor(self) -> Any:
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(patch_size=self.patch_size, merge_size=self.merge,
                                        temporal_patch_size=self.temporal_patch_size, image_mean=[0.5, 0.5, 0.5],
                                        image_std=[0.5, 0.5, 0.5])

    def install(self, model: nn.Module, rope: RopeSpec | tuple[RopeSpec, ...] | None) -> None:
        super().install(model, rope)  # interleaved M-RoPE attention
        for k in range(self.deepstack_layers):
            block = model.blocks[k]
            block.__class__ = deepstack_block_class(type(block))
            block.deepstack_index = k
            block.hook_deepstack = HookPoint()  # [image tokens of the pass, d_model]

    def _visual(self, pixel_values: Any, image_grid_thw: Tensor | None) -> Any:
        from ..errors import ImageTokenMismatchError

        if image_grid_thw is None:
            raise ImageTokenMismatchError("Qwen-VL images need image_grid_thw (one [t, h, w] row per image).")
        pv = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
        if pv.shape[0] != int(image_grid_thw.prod(-1).sum()):
            raise ImageTokenMismatchError(f"pixel_values has {pv.shape[0]} patches but image_grid_thw implies "
                                          f"{int(image_grid_thw.prod(-1).sum())}; they must come from one processor "
                                          "call.")
        dtype = next(self.visual.parameters()).dtype
        return self.visual(pv.to(device=self.device, dtype=dtype), grid_thw=image_grid_thw.to(self.device))

    def encode_images(self, pixel_values: Any, image_grid_thw: Tensor | None = None,
                      **_: Any) -> Float[Tensor, "img_tok d_model"]:
        return self._visual(pixel_values, image_grid_thw).pooler_output

    def encode_with_extras(self, **model_inputs: Any) -> tuple[Tensor, dict[str, Any]]:
        out = self._visual(model_inputs.get("pixel_values"), model_inputs.get("image_grid_thw"))
        return out.pooler_output, {"deepstack": tuple(out.deepstack_features)}
