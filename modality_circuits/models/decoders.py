"""Text decoders of MLLMs -> ``HookedTransformerConfig`` + TransformerLens state dict.

Registered by the HF text config's ``model_type`` (``llama``, ``mistral``, ``qwen2``); each entry builds the
config the way TransformerLens's ``convert_hf_model_config`` does for that family (without touching the hub)
and converts weights with TransformerLens's own converter. :func:`check_state_dict` then asserts that every
parameter of the HookedTransformer gets exactly one tensor of the right shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
from transformer_lens.loading_from_pretrained import _apply_llama3_rope_scaling, _get_rope_theta
from transformer_lens.pretrained.weight_conversions import (
    convert_llama_weights,
    convert_mistral_weights,
    convert_qwen2_weights,
)

from ..errors import UnsupportedArchitectureError, WeightConversionError


@dataclass(frozen=True)
class DecoderSpec:
    """How to turn one HF decoder family into TransformerLens form."""

    tl_architecture: str
    cfg_fn: Callable[[Any], dict]
    convert_fn: Callable[[Any, HookedTransformerConfig], dict]


DECODERS: dict[str, DecoderSpec] = {}


def register_decoder(model_type: str, spec: DecoderSpec) -> None:
    DECODERS[model_type] = spec


def _d_head(c: Any) -> int:
    hd = getattr(c, "head_dim", None)
    return int(hd) if hd else c.hidden_size // c.num_attention_heads


def _llama_cfg(c: Any) -> dict:
    d = {
        "d_model": c.hidden_size, "d_head": _d_head(c), "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size, "n_layers": c.num_hidden_layers, "n_ctx": c.max_position_embeddings,
        "eps": c.rms_norm_eps, "d_vocab": c.vocab_size, "act_fn": c.hidden_act,
        "n_key_value_heads": (c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None),
        "normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
        "rotary_dim": _d_head(c), "rotary_base": _get_rope_theta(c), "final_rms": True, "gated_mlp": True,
    }
    _apply_llama3_rope_scaling(d, c)
    return d


def _mistral_cfg(c: Any) -> dict:
    d = _llama_cfg(c)
    if getattr(c, "sliding_window", None):
        d.update(window_size=c.sliding_window, attn_types=["local"] * c.num_hidden_layers, use_local_attn=True)
    return d


def _qwen2_cfg(c: Any) -> dict:
    d = _llama_cfg(c)
    d["n_key_value_heads"] = c.num_key_value_heads  # TL's Qwen2 path always uses the GQA layout
    return d


register_decoder("llama", DecoderSpec("LlamaForCausalLM", _llama_cfg, convert_llama_weights))
register_decoder("mistral", DecoderSpec("MistralForCausalLM", _mistral_cfg, convert_mistral_weights))
register_decoder("qwen2", DecoderSpec("Qwen2ForCausalLM", _qwen2_cfg, convert_qwen2_weights))
# Qwen2-VL / Qwen2.5-VL text decoders are Qwen2 (their M-RoPE is installed by the adapter)
register_decoder("qwen2_vl_text", DecoderSpec("Qwen2ForCausalLM", _qwen2_cfg, convert_qwen2_weights))
register_decoder("qwen2_5_vl_text", DecoderSpec("Qwen2ForCausalLM", _qwen2_cfg, convert_qwen2_weights))


def decoder_spec(text_config: Any) -> DecoderSpec:
    mt = getattr(text_config, "model_type", None)
    if mt not in DECODERS:
        raise UnsupportedArchitectureError(
            f"Text decoder type {mt!r} is not supported. Supported decoder types: {sorted(DECODERS)}. "
            "Register one with modality_circuits.models.decoders.register_decoder().")
    return DECODERS[mt]


def build_cfg(text_config: Any, dtype: torch.dtype, device: str | torch.device, **overrides: Any
              ) -> HookedTransformerConfig:
    """HookedTransformerConfig for an HF text config (no hub access)."""
    spec = decoder_spec(text_config)
    d = spec.cfg_fn(text_config)
    d.update(original_architecture=spec.tl_architecture, dtype=dtype, device=str(device), n_devices=1,
             default_prepend_bos=False, tokenizer_prepends_bos=False, init_weights=False)
    d.update(overrides)
    return HookedTransformerConfig.from_dict(d)


def convert_decoder(language_model: nn.Module, lm_head: nn.Module, cfg: HookedTransformerConfig,
                    text_config: Any) -> dict[str, torch.Tensor]:
    """TL state dict from an HF decoder body (``embed_tokens``, ``layers``, ``norm``) and its ``lm_head``."""
    wrapper = SimpleNamespace(model=language_model, lm_head=lm_head)
    sd = decoder_spec(text_config).convert_fn(wrapper, cfg)
    return {k: v.detach() for k, v in sd.items()}


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], exclude_prefix: str = "image_encoder."
                     ) -> None:
    """Assert every key and shape: the converted weights cover the model's parameters exactly.

    Buffers (rotary tables, masks) and the image encoder's parameters (``exclude_prefix``) are excluded;
    everything else must match one-to-one.
    """
    expected = {k: v.shape for k, v in model.named_parameters() if not k.startswith(exclude_prefix)}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: model {tuple(expected[k])} vs converted {got[k]}" for k in expected
             if k in got and tuple(expected[k]) != got[k]]
    if missing or unexpected or wrong:
        raise WeightConversionError(
            "Converted weights do not match the HookedTransformer: "
            f"missing={missing[:8]}{'…' if len(missing) > 8 else ''} "
            f"unexpected={unexpected[:8]}{'…' if len(unexpected) > 8 else ''} wrong_shape={wrong[:8]}. "
            "The HF config and checkpoint disagree, or the decoder type needs its own converter.")
