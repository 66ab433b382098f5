"""Rotary position embeddings exactly as HF computes them, for every rope type a real MLLM checkpoint uses.

HF derives ``inv_freq`` (``[rotary_dim / 2]``) and a post-processing ``attention_scaling`` from the text
config (``rope_parameters``) with ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``; its rotary module
then uses ``cos = cos(pos · inv_freq) · attention_scaling`` (same for ``sin``), with the frequencies duplicated
in the ``rotate_half`` layout. :func:`rope_spec` calls HF's own functions, so the converted model reproduces
``default``, ``linear``, ``dynamic``, ``yarn`` and ``llama3`` exactly; everything else is refused by name.

* ``dynamic`` (NTK) equals ``default`` up to ``max_position_embeddings``; beyond it HF recomputes the frequencies
  from the longest sequence its rotary module has seen so far (state kept across forwards), so there is no
  stateless exact answer: a longer prompt is refused with :class:`PositionLimitError` naming both lengths.
* The other types have no length limit: the rotary tables grow with the prompt actually given (HF computes
  ``cos``/``sin`` on the fly for any position), so prompts longer than ``max_position_embeddings`` run as in HF.

:func:`hf_rotary_class` subclasses TransformerLens's attention class of every block when the model is built
(:func:`install_hf_rotary`): it computes TransformerLens's ``rotary_sin``/``rotary_cos`` tables from
the HF frequencies and grows them on demand. M-RoPE (Qwen-VL) uses the same :class:`RopeSpec` in its adapter.
Checkpoints whose ``rope_parameters`` hold one entry per layer type (Gemma 3: ``sliding_attention`` with theta 1e4,
``full_attention`` with theta 1e6 and possibly linear scaling) get one spec per layer (:func:`layer_rope_specs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.components.abstract_attention import AbstractAttention

from .._types import Float
from ..errors import PositionLimitError, UnsupportedArchitectureError

#: rope types converted exactly (HF ``rope_parameters["rope_type"]``).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """HF's rotary parameters of a text config.

    Attributes:
        rope_type: HF ``rope_type``.
        inv_freq: ``Float[Tensor, "rotary_dim/2"]`` (float32), HF's inverse frequencies.
        attention_scaling: HF's factor on ``cos``/``sin`` (1 except for ``yarn``).
        max_positions: the longest sequence computed exactly (``dynamic``), or None for no limit.
    """

    rope_type: str
    inv_freq: Tensor
    attention_scaling: float
    max_positions: int | None = None

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])

    def check_length(self, n_positions: int) -> None:
        """Raise :class:`PositionLimitError` if ``n_positions`` cannot be computed exactly."""
        if self.max_positions is not None and n_positions > self.max_positions:
            raise PositionLimitError(
                f"The input needs {n_positions} rotary positions but rope_type={self.rope_type!r} is exact only up "
                f"to max_position_embeddings={self.max_positions}: beyond it HF's dynamic NTK frequencies depend on "
                "the longest sequence the model has run before. Shorten the prompt (fewer or smaller images) or use "
                "a checkpoint with a static rope type.")

    def sin_cos(self, n_positions: int, dtype: torch.dtype) -> tuple[Float[Tensor, "pos rotary_dim"], Tensor]:
        """TransformerLens-layout tables ``(sin, cos)`` of positions ``0 … n_positions − 1`` (as HF computes them)."""
        pos = torch.arange(n_positions, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.float()[None, :]  # [pos, rotary_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # rotate_half layout (TL: rotary_adjacent_pairs=False)
        return (emb.sin() * self.attention_scaling).to(dtype), (emb.cos() * self.attention_scaling).to(dtype)


def _rope_parameters(tc: Any, layer_type: str | None = None) -> dict:
    rp = getattr(tc, "rope_parameters", None)
    if rp is None:
        raise UnsupportedArchitectureError(
            f"Text config {type(tc).__name__} has no rope_parameters; it was not written by transformers >= 5 "
            "and cannot be converted exactly. Re-save the checkpoint with transformers 5 (save_pretrained).")
    if layer_type is not None:
        if not isinstance(rp.get(layer_type), dict):
            raise UnsupportedArchitectureError(
                f"rope_parameters has no entry for layer type {layer_type!r} (it has {sorted(rp)}).")
        return dict(rp[layer_type])
    if any(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedArchitectureError(
            f"rope_parameters has per-layer-type entries ({sorted(rp)}) but the config has no layer_types naming "
            "them; layer-dependent rotary embeddings are converted only with layer_types.")
    return dict(rp)


def per_layer_type(tc: Any) -> bool:
    """Whether ``tc.rope_parameters`` holds one entry per layer type (Gemma 3)."""
    rp = getattr(tc, "rope_parameters", None) or {}
    return bool(rp) and all(isinstance(v, dict) for v in rp.values())


def layer_rope_specs(tc: Any, head_dim: int) -> tuple[RopeSpec, ...]:
    """One :class:`RopeSpec` per layer: the entry of ``rope_parameters`` named by the layer's ``layer_types``."""
    types = getattr(tc, "layer_types", None)
    if not types:
        _rope_parameters(tc)  # raises: per-layer entries without layer_types
    specs = {t: rope_spec(tc, head_dim, layer_type=t) for t in sorted(set(types))}
    return tuple(specs[t] for t in types)


def rope_spec(tc: Any, head_dim: int, layer_type: str | None = None) -> RopeSpec:
    """HF's rotary parameters of text config ``tc`` (of the ``layer_type`` entry when the parameters are per layer
    type; refuses what cannot be reproduced exactly)."""
    rp = _rope_parameters(tc, layer_type)
    rtype = rp.get("rope_type", "default")
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope_parameters.rope_type={rtype!r} is not converted (supported: {list(SUPPORTED_ROPE_TYPES)}); "
            "its frequencies would be approximated, so the checkpoint is refused.")
    prf = rp.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1.0, 1):
        raise UnsupportedArchitectureError(
            f"rope_parameters.partial_rotary_factor={prf!r} is not converted (only 1.0: rotary on the whole head).")
    if rtype == "default":
        theta = float(rp["rope_theta"])
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kw = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rtype](tc, torch.device("cpu"), **kw)
    if 2 * inv_freq.shape[0] != head_dim:
        raise UnsupportedArchitectureError(
            f"rope_type={rtype!r} gives {inv_freq.shape[0]} frequencies for head_dim={head_dim}; only rotary on the "
            "whole head is converted.")
    limit = int(tc.max_position_embeddings) if rtype == "dynamic" else None
    return RopeSpec(rtype, inv_freq.float().cpu(), float(scaling), limit)


def _calculate_sin_cos_rotary(self: Any, rotary_dim: int, n_ctx: int, base: float = 10000,
                              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    return self.hf_rope.sin_cos(n_ctx, dtype)


def _apply_rotary(self: Any, x: Float[Tensor, "batch pos head_index d_head"], past_kv_pos_offset: int = 0,
                  attention_mask: Tensor | None = None) -> Tensor:
    need = past_kv_pos_offset + x.size(1)
    self.hf_rope.check_length(need)
    have = self.rotary_cos.shape[0]
    if need > have:  # TL caps its own growth at n_ctx; HF computes any position
        sin, cos = self.hf_rope.sin_cos(max(need, 2 * have), self.cfg.dtype)
        self.rotary_sin, self.rotary_cos = sin.to(self.rotary_sin.device), cos.to(self.rotary_cos.device)
    return AbstractAttention.apply_rotary(self, x, past_kv_pos_offset, attention_mask)


_CLASSES: dict[type, type] = {}


def hf_rotary_class(cls: type) -> type:
    """``cls`` (a TransformerLens attention class) with rotary tables from ``self.hf_rope`` (:class:`RopeSpec`),
    grown on demand beyond ``n_ctx``. One subclass per attention class, so built modules can switch to it."""
    if getattr(cls, "_hf_rotary", False):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"HFRotary{cls.__name__}", (cls,), {
            "_hf_rotary": True, "calculate_sin_cos_rotary": _calculate_sin_cos_rotary,
            "apply_rotary": _apply_rotary, "__module__": __name__})
    return _CLASSES[cls]


def install_hf_rotary(model: nn.Module, spec: RopeSpec | tuple[RopeSpec, ...]) -> None:
    """Make every block's attention use HF's rotary tables (called once, when the model is built); ``spec`` is one
    spec for all layers or one per layer."""
    specs = spec if isinstance(spec, tuple) else (spec,) * len(model.blocks)
    if len(specs) != len(model.blocks):
        raise UnsupportedArchitectureError(f"{len(specs)} rotary specs for {len(model.blocks)} layers.")
    for block, spec in zip(model.blocks, specs):
        if spec.rotary_dim != model.cfg.rotary_dim:
            raise UnsupportedArchitectureError(
                f"rotary_dim {model.cfg.rotary_dim} != the rope spec's {spec.rotary_dim}.")
        attn = block.attn
        attn.__class__ = hf_rotary_class(type(attn))
        attn.hf_rope = spec
        n = attn.rotary_cos.shape[0]
        sin, cos = spec.sin_cos(n, model.cfg.dtype)
        attn.rotary_sin, attn.rotary_cos = sin.to(attn.rotary_sin.device), cos.to(attn.rotary_cos.device)
