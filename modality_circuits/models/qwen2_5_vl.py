"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): as Qwen2-VL, with a window-attention ViT.

The decoder side (Qwen2 + M-RoPE for images) is identical to Qwen2-VL's; the HF vision tower (``model.visual``,
window attention and RMSNorm blocks, 2×2 merger) runs unchanged as the image encoder, so this adapter only
registers the class. Video inputs (whose temporal positions are scaled by ``tokens_per_second``) are not
supported.
"""

from __future__ import annotations

from .base import register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    hf_classes = ("Qwen2_5_VLForConditionalGeneration",)
