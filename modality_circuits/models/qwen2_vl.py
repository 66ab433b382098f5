"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): ViT with 2×2 patch merger + Qwen2 decoder with M-RoPE.

The decoder is a TransformerLens HookedTransformer (Qwen2 weights, GQA, q/k/v biases) whose attention applies the
**multimodal rotary embedding** exactly as HF does, so ``hook_attn_scores``/``hook_pattern``/``hook_z`` are real
and writable:

* positions are 3-D ``(t, h, w)``: text tokens advance all three together; an image with LLM grid
  ``(T, H/m, W/m)`` (``m`` = ``spatial_merge_size``) gets ``t = start + ti``, ``h = start + hi``,
  ``w = start + wi``, and the text after it continues at ``start + max(H, W)/m`` (as ``get_rope_index``);
  left padding is skipped (positions count real tokens only);
* the rotary frequencies ``inv_freq[j]`` are split into ``mrope_section = [s_t, s_h, s_w]`` chunks, chunk ``i``
  rotated by position component ``i % 3``, then duplicated (``rotate_half`` layout); Qwen3-VL interleaves them
  instead (:func:`mrope_axes`);
* cached continuations (generation, answer scoring) continue at ``max position + 1``.

The image features come from the HF vision tower (``model.visual``, patch merger included; window attention
for Qwen2.5-VL) and are injected at the ``<|image_pad|>`` positions. ``mm_token_type_ids`` is derived from the
tokens (1 at image tokens), as the HF processor produces it; a caller-supplied one is checked against them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._types import Float, Int
from ..errors import ImageTokenMismatchError
from ..interventions.core import align_rows
from ..prompts import ChatTemplate
from .base import Adapter, ImageGrid, register_adapter
from .forward_state import current
from .rope import RopeSpec

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def mrope_positions(tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], image_token_id: int,
                    image_grid_thw: Tensor | None, merge: int) -> Int[Tensor, "3 batch pos"]:
    """3-D rotary positions of left-padded prompts (HF ``get_rope_index`` for images; pads get 0)."""
    B, L = tokens.shape
    pos = torch.zeros(3, B, L, dtype=torch.long, device=tokens.device)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(B):
        real = attention_mask[b].bool()
        is_img = (tokens[b][real] == image_token_id).tolist()
        chunks, cur, i = [], 0, 0
        while i < len(is_img):
            j = i
            while j < len(is_img) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                chunks.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
                i = j
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ImageTokenMismatchError("More image-token runs than image_grid_thw rows; give one grid per "
                                              "image (model.prepare(...) does).") from None
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            if j - i < n:
                raise ImageTokenMismatchError(f"An image run has {j - i} tokens but its grid {[t, h, w]} needs {n}; "
                                              "check image_grid_thw.")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w) // merge
            i += n  # a longer run holds several adjacent images
        seq = torch.cat(chunks, 1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        pos[:, b, real] = seq.to(tokens.device)
    if next(grids, None) is not None:
        raise ImageTokenMismatchError("image_grid_thw has more rows than the prompts have images.")
    return pos


def _mrope_apply_rotary(self: nn.Module, x: Float[Tensor, "batch pos head d_head"], past_kv_pos_offset: int = 0,
                        attention_mask: Tensor | None = None) -> Tensor:
    """M-RoPE ``apply_rotary`` of :class:`MRopeAttention`: positions from the running forward's state."""
    n, q = x.shape[:2]
    pos = current().rope_positions
    if pos is None:  # text-only prompt: TL's 1-D positions from the attention mask
        assert attention_mask is not None
        p1 = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, past_kv_pos_offset:past_kv_pos_offset + q]
        p = p1[None].expand(3, -1, -1)
    else:
        p = align_rows(pos.permute(1, 0, 2), n).permute(1, 0, 2)  # [3, n, L0]
        need = past_kv_pos_offset + q - p.shape[2]
        if need > 0:  # continuation beyond the prompt: text positions after the prompt's maximum
            nxt = p.amax(dim=(0, 2))[None, :, None] + 1 + torch.arange(need, device=p.device)[None, None]
            p = torch.cat([p, nxt.expand(3, -1, -1)], 2)
        p = p[:, :, past_kv_pos_offset:past_kv_pos_offset + q]
    rope: RopeSpec = self.mrope_spec
    if p.numel():
        rope.check_length(int(p.max()) + 1)  # HF's dynamic-rope length is max(position) + 1
    freqs = p[..., None].to(x.device).float() * rope.inv_freq.to(x.device)  # [3, n, q, d/2]
    axes = self.mrope_axes.to(x.device)  # [d/2]: the position component (t, h, w) of each frequency
    f = torch.gather(freqs, 0, axes.expand(1, *freqs.shape[1:]))[0]  # [n, q, d/2]
    f = torch.cat([f, f], dim=-1)[:, :, None, :]  # [n, q, 1, d_head]
    rd = f.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    cos, sin = (f.cos() * rope.attention_scaling).to(x.dtype), (f.sin() * rope.attention_scaling).to(x.dtype)
    rotated = x_rot * cos + torch.cat([-x2, x1], -1) * sin
    return torch.cat([rotated, x_pass], -1)


def mrope_axes(sections: list[int], interleaved: bool = False) -> Int[Tensor, " half_d_head"]:
    """The position component (0 = t, 1 = h, 2 = w) that rotates each rotary frequency. Chunked (Qwen2-VL,
    Qwen2.5-VL): ``sections[i]`` consecutive frequencies for component ``i``. Interleaved (Qwen3-VL's
    ``recomposition_frequencies``): frequency ``j`` is ``h`` if ``j % 3 == 1`` and ``j < 3·sections[1]``, ``w`` if
    ``j % 3 == 2`` and ``j < 3·sections[2]``, else ``t``."""
    n = sum(sections)
    if not interleaved:
        return torch.cat([torch.full((s,), i % 3, dtype=torch.long) for i, s in enumerate(sections)])
    axes = torch.zeros(n, dtype=torch.long)
    for dim in (1, 2):
        axes[dim:min(n, 3 * sections[dim]):3] = dim
    return axes


_MROPE_CLASSES: dict[type, type] = {}


def mrope_attention_class(cls: type) -> type:
    """``cls`` (a TransformerLens attention class) with Qwen-VL's multimodal rotary embedding: ``apply_rotary``
    reads the prompt's 3-D positions from the running forward (:mod:`~modality_circuits.models.forward_state`).
    One subclass per attention class; built blocks switch to it when the model is built."""
    if cls not in _MROPE_CLASSES:
        _MROPE_CLASSES[cls] = type(f"MRope{cls.__name__}", (cls,), {
            "apply_rotary": _mrope_apply_rotary, "__module__": __name__})
    return _MROPE_CLASSES[cls]


@register_adapter
class Qwen2VLAdapter(Adapter):
    hf_classes = ("Qwen2VLForConditionalGeneration",)
    uses_rope_positions = True
    #: M-RoPE frequency layout: chunked sections (Qwen2-VL, Qwen2.5-VL) or interleaved (Qwen3-VL)
    interleaved: bool = False
    #: HF's default ``mrope_section`` of the family
    default_sections: tuple[int, ...] = (16, 24, 24)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, image_processor: Any = None):
        super().__init__()
        cfg = hf_model.config
        self.visual = hf_model.model.visual
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.vision_start = tokenizer.convert_ids_to_tokens(int(cfg.vision_start_token_id))
        self.vision_end = tokenizer.convert_ids_to_tokens(int(cfg.vision_end_token_id))
        vc = cfg.vision_config
        self.patch_size, self.merge = int(vc.patch_size), int(vc.spatial_merge_size)
        self.temporal_patch_size = int(vc.temporal_patch_size)
        tc = cfg.text_config
        d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        rp = tc.rope_parameters
        self.sections = list(rp.get("mrope_section") or self.default_sections)  # HF's default
        if sum(self.sections) != d_head // 2:
            raise ImageTokenMismatchError(f"mrope_section {self.sections} must sum to d_head/2 = {d_head // 2}.")
        self.image_processor = image_processor or self.default_image_processor()

    def default_image_processor(self) -> Any:
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(patch_size=self.patch_size, merge_size=self.merge,
                                        temporal_patch_size=self.temporal_patch_size)

    def default_template(self) -> ChatTemplate:
        return ChatTemplate(system=QWEN_SYSTEM, user_prefix="<|im_start|>user\n", sep="\n", image_sep="",
                            assistant_prefix="<|im_end|>\n<|im_start|>assistant\n",
                            image_prefix=self.vision_start, image_suffix=self.vision_end)

    def install(self, model: nn.Module, rope: RopeSpec | None) -> None:
        """M-RoPE with HF's frequencies for the rope type (``rope``, from the text config by ``build_cfg``)."""
        if rope is None:
            raise ImageTokenMismatchError("Qwen-VL's multimodal rotary embedding needs the text config's rope spec.")
        self.rope = rope
        for block in model.blocks:
            attn = block.attn
            attn.__class__ = mrope_attention_class(type(attn))
            attn.mrope_spec, attn.mrope_axes = rope, mrope_axes(self.sections, self.interleaved)

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        t, h, w = (int(x) for x in model_inputs["image_grid_thw"][k])
        if t != 1:
            raise ImageTokenMismatchError(f"Image {k} has {t} temporal patches; grids are shown for still images only.")
        return ImageGrid(h // self.merge, w // self.merge)

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> Any:
        """Undo the processor's patch flattening: ``[t·h·w, C·T·p·p]`` in merge-block order -> ``[C, h·p, w·p]``."""
        t, h, w = (int(x) for x in model_inputs["image_grid_thw"][k])
        p, m, T = self.patch_size, self.merge, self.temporal_patch_size
        x = model_inputs["pixel_values"][k].reshape(t, h // m, w // m, m, m, -1, T, p, p)  # C is the free axis
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, T, -1, h * p, w * p)  # [t, T, C, H, W]
        return self._denormalize(x[0, 0])

    def process_images(self, images: list[Any]) -> tuple[dict[str, Any], list[int]]:
        if any(isinstance(im, Tensor) for im in images):
            raise ImageTokenMismatchError("Qwen-VL needs PIL images (the processor computes each image's grid).")
        out = self.image_processor(images=list(images), return_tensors="pt")
        grid = out["image_grid_thw"]  # [n_images, 3]
        per_image = (grid.prod(-1)).tolist()
        pv = list(torch.split(out["pixel_values"], per_image))
        n_tok = (grid.prod(-1) // self.merge ** 2).tolist()
        return {"pixel_values": pv, "image_grid_thw": grid}, [int(n) for n in n_tok]

    def encode_images(self, pixel_values: Any, image_grid_thw: Tensor | None = None,
                      **_: Any) -> Float[Tensor, "img_tok d_model"]:
        if image_grid_thw is None:
            raise ImageTokenMismatchError("Qwen-VL images need image_grid_thw (one [t, h, w] row per image).")
        pv = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
        dtype = next(self.visual.parameters()).dtype
        if pv.shape[0] != int(image_grid_thw.prod(-1).sum()):
            raise ImageTokenMismatchError(f"pixel_values has {pv.shape[0]} patches but image_grid_thw implies "
                                          f"{int(image_grid_thw.prod(-1).sum())}; they must come from one processor "
                                          "call.")
        out = self.visual(pv.to(device=self.device, dtype=dtype), grid_thw=image_grid_thw.to(self.device))
        return out.pooler_output

    def rope_positions(self, tokens: Tensor, attention_mask: Tensor, model_inputs: dict[str, Any]) -> Tensor | None:
        videos = sorted(k for k in ("pixel_values_videos", "video_grid_thw") if model_inputs.get(k) is not None)
        if videos:
            raise ImageTokenMismatchError(f"{videos} given: videos are not converted (only still images); they would "
                                          "be dropped silently, so the call is refused.")
        grid = model_inputs.get("image_grid_thw")
        mm = model_inputs.get("mm_token_type_ids")
        is_img = tokens == self.image_token_id
        if mm is not None and not torch.equal(mm.to(tokens.device).bool(), is_img):
            raise ImageTokenMismatchError("mm_token_type_ids disagrees with the image-token positions of the prompt.")
        if is_img.any() and grid is None:
            raise ImageTokenMismatchError(
                "The prompt has image tokens but no image_grid_thw: Qwen-VL's 3-D rotary positions cannot be built "
                "(no silent fallback to 1-D positions). Pass the batch from model.prepare(...).")
        return mrope_positions(tokens, attention_mask, self.image_token_id, grid, self.merge)
