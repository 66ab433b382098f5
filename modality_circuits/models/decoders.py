"""Text decoders of MLLMs -> ``HookedTransformerConfig`` + weights, exact or refused.

Registered by the HF text config's ``model_type`` (``llama``, ``mistral``, ``qwen2``, the Qwen-VL text decoders
(Qwen3-VL's with per-head q/k norms), and ``gemma3_text``: Gemma norms ``(1 + w)``, sandwich norms, per-head q/k norms,
scaled embeddings, ``query_pre_attn_scalar``, per-layer-type rotary parameters; its soft-capping fields are read by HF's
multimodal Gemma 3 nowhere, so not here either). Each :class:`DecoderSpec` declares which HF config fields it
**converts**; :func:`check_text_config` compares every other field HF knows for that config class with the class default
and refuses any non-default value it has no conversion for, naming field and value (:data:`IGNORED_FIELDS` lists the
fields that do not change the decoder's computation, each with the reason). Rotary embeddings come from HF's own
functions (:mod:`~modality_circuits.models.rope`).

Weights are mapped by :func:`llama_layer_weights` one HF tensor at a time, with **two-sided accounting**:
:func:`load_decoder` asserts that every HookedTransformer parameter gets exactly one tensor of its shape and that every
HF decoder weight was used (else :class:`~modality_circuits.errors.WeightConversionError` lists them). The parameters
are views in HF's memory layout (no per-forward weight copies in TransformerLens's linear layers); when the HF model is
owned by the loader they are the loaded tensors themselves and each HF layer is dropped once converted, so loading peaks
near one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import einops
import torch
from torch import Tensor, nn
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

from ..errors import UnsupportedArchitectureError, WeightConversionError
from .rope import RopeSpec, layer_rope_specs, per_layer_type, rope_spec

#: Fields HF knows that do not change what the decoder computes in eval mode (field -> why).
IGNORED_FIELDS: dict[str, str] = {
    "transformers_version": "metadata", "architectures": "metadata", "_name_or_path": "metadata",
    "model_type": "selects the converter", "dtype": "weights are loaded in the dtype asked for",
    "output_hidden_states": "an HF output option", "output_attentions": "an HF output option",
    "return_dict": "an HF output option", "use_cache": "an HF generation option",
    "chunk_size_feed_forward": "not read by these decoders",
    "is_encoder_decoder": "not read by these decoder-only models",
    "id2label": "classification heads only", "label2id": "classification heads only",
    "problem_type": "classification heads only", "initializer_range": "random initialisation only",
    "pad_token_id": "a tokenizer id; the forward does not read it",
    "bos_token_id": "a tokenizer id; the forward does not read it",
    "eos_token_id": "a tokenizer id; the forward does not read it",
    "attention_dropout": "dropout is off in eval mode",
    "pretraining_tp": "not read by transformers 5's Llama modeling code",
    "tie_word_embeddings": "the lm_head weight is read as it is (tied or not)",
}

#: Fields every Llama-shaped decoder converts.
LLAMA_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
})

#: HF ``hidden_act`` -> TransformerLens ``act_fn`` (same function).
ACT_FNS = {"silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


@dataclass(frozen=True)
class DecoderSpec:
    """How to turn one HF decoder family into TransformerLens form.

    Attributes:
        tl_architecture: TransformerLens ``original_architecture``.
        converted: HF config fields the family converts (beyond :data:`IGNORED_FIELDS`).
        cfg_fn: HF text config -> ``HookedTransformerConfig`` fields.
        checks: extra validation of field values (raises :class:`UnsupportedArchitectureError`).
        qkv_bias: q/k/v projections always have biases (Qwen2).
        layer_weights: ``(HF layer, index, cfg)`` -> ``(TL parameter, tensor, HF weight)`` triples (None: Llama's).
        gemma_norms: RMSNorm weights are stored as ``w`` and applied as ``1 + w`` (Gemma); the embeddings are
            multiplied by ``sqrt(d_model)`` (folded into ``W_E``, so the unembedding keeps its own copy).
    """

    tl_architecture: str
    converted: frozenset[str]
    cfg_fn: Callable[[Any], dict]
    checks: Callable[[Any], None] = lambda c: None
    qkv_bias: bool = False
    layer_weights: Callable[[nn.Module, int, HookedTransformerConfig],
                            Iterator[tuple[str, Tensor, str | None]]] | None = None
    gemma_norms: bool = False


DECODERS: dict[str, DecoderSpec] = {}


def register_decoder(model_type: str, spec: DecoderSpec) -> None:
    DECODERS[model_type] = spec


def d_head(c: Any) -> int:
    hd = getattr(c, "head_dim", None)
    return int(hd) if hd else c.hidden_size // c.num_attention_heads


def _refuse(c: Any, field: str, value: Any, why: str) -> None:
    raise UnsupportedArchitectureError(
        f"{type(c).__name__}.{field}={value!r} is not converted: {why}. The checkpoint is refused rather than run "
        "approximately.")


def _sliding_layers(c: Any) -> list[bool]:
    """Which layers use sliding-window attention (HF ``layer_types``, or Mistral's global ``sliding_window``)."""
    types = getattr(c, "layer_types", None)
    if types is not None:
        bad = sorted(set(types) - {"full_attention", "sliding_attention"})
        if bad:
            _refuse(c, "layer_types", bad, "only full_attention and sliding_attention layers exist here")
        return [t == "sliding_attention" for t in types]
    return [bool(getattr(c, "sliding_window", None))] * c.num_hidden_layers


def _llama_cfg(c: Any, act_field: str = "hidden_act") -> dict:
    act = getattr(c, act_field)
    if act not in ACT_FNS:
        _refuse(c, act_field, act, f"supported activations are {sorted(ACT_FNS)}")
    dh = d_head(c)
    d = {
        "d_model": c.hidden_size, "d_head": dh, "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size, "n_layers": c.num_hidden_layers, "n_ctx": c.max_position_embeddings,
        "eps": c.rms_norm_eps, "d_vocab": c.vocab_size, "act_fn": ACT_FNS[act],
        "n_key_value_heads": (c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None),
        "normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
        "rotary_dim": dh, "final_rms": True, "gated_mlp": True,
    }
    sliding = _sliding_layers(c)
    if any(sliding):
        if not getattr(c, "sliding_window", None):
            _refuse(c, "sliding_window", getattr(c, "sliding_window", None), "sliding layers need a window size")
        d.update(window_size=int(c.sliding_window), use_local_attn=True,
                 attn_types=["local" if s else "global" for s in sliding])
    return d


def _qwen2_cfg(c: Any) -> dict:
    d = _llama_cfg(c)
    d["n_key_value_heads"] = c.num_key_value_heads  # TL's Qwen2 path always uses the GQA layout
    return d


def _llama_checks(c: Any) -> None:
    if getattr(c, "mlp_bias", False):
        _refuse(c, "mlp_bias", True, "TransformerLens's gated MLP adds its input bias after the gate product, so "
                "HF's gate_proj/up_proj biases have no exact counterpart")


register_decoder("llama", DecoderSpec("LlamaForCausalLM", LLAMA_FIELDS | {"attention_bias", "mlp_bias"},
                                      _llama_cfg, _llama_checks))
register_decoder("mistral", DecoderSpec("MistralForCausalLM", LLAMA_FIELDS | {"sliding_window"}, _llama_cfg))
_QWEN2_FIELDS = LLAMA_FIELDS | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
register_decoder("qwen2", DecoderSpec("Qwen2ForCausalLM", _QWEN2_FIELDS, _qwen2_cfg, qkv_bias=True))
# Qwen2-VL / Qwen2.5-VL text decoders are Qwen2 (their M-RoPE is installed by the adapter)
register_decoder("qwen2_vl_text", DecoderSpec("Qwen2ForCausalLM", _QWEN2_FIELDS, _qwen2_cfg, qkv_bias=True))
register_decoder("qwen2_5_vl_text", DecoderSpec("Qwen2ForCausalLM", _QWEN2_FIELDS, _qwen2_cfg, qkv_bias=True))


def _gemma3_cfg(c: Any) -> dict:
    # attn_logit_softcapping / final_logit_softcapping: HF's Gemma 3 attention never passes the former to its
    # attention function, and Gemma3ForConditionalGeneration never applies the latter (transformers 5.23), so
    # neither is applied here: exactly HF (tests/models/test_gemma3.py sets both and compares).
    return {**_llama_cfg(c, "hidden_activation"), "use_qk_norm": True, "use_normalization_before_and_after": True,
            "use_attn_scale": True, "attn_scale": float(c.query_pre_attn_scalar) ** 0.5}  # HF: scores · qpas^-0.5


def _gemma3_checks(c: Any) -> None:
    if getattr(c, "use_bidirectional_attention", False):
        _refuse(c, "use_bidirectional_attention", True, "a bidirectional text decoder (EmbeddingGemma) is not a "
                "causal language model")


def _one_plus(w: Tensor) -> Tensor:
    """A Gemma RMSNorm weight as it is applied: ``1 + w``, in float32 (HF computes the norm in float32)."""
    return 1.0 + w.detach().float()


def gemma3_layer_weights(layer: nn.Module, i: int, cfg: HookedTransformerConfig
                         ) -> Iterator[tuple[str, Tensor, str | None]]:
    """Decoder layer ``i`` of Gemma 3: Llama's projections; sandwich norms (``ln1``/``ln1_post`` around attention,
    ``ln2``/``ln2_post`` around the MLP) and per-head ``q_norm``/``k_norm``, each as ``1 + w``."""
    b, h = f"blocks.{i}", f"layers.{i}"
    for name, t, hf in llama_layer_weights(layer, i, cfg):
        if not name.endswith(("ln1.w", "ln2.w")):
            yield name, t, hf
    for tl, mod, hf in (("ln1.w", layer.input_layernorm, "input_layernorm"),
                        ("ln1_post.w", layer.post_attention_layernorm, "post_attention_layernorm"),
                        ("ln2.w", layer.pre_feedforward_layernorm, "pre_feedforward_layernorm"),
                        ("ln2_post.w", layer.post_feedforward_layernorm, "post_feedforward_layernorm"),
                        ("attn.q_norm.w", layer.self_attn.q_norm, "self_attn.q_norm"),
                        ("attn.k_norm.w", layer.self_attn.k_norm, "self_attn.k_norm")):
        yield f"{b}.{tl}", _one_plus(mod.weight), f"{h}.{hf}.weight"


_GEMMA3_FIELDS = (LLAMA_FIELDS - {"hidden_act"}) | {
    "hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window", "layer_types",
    "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
    "_sliding_window_pattern"}  # the pattern only generates layer_types when a config has none
register_decoder("gemma3_text", DecoderSpec("Gemma3ForCausalLM", _GEMMA3_FIELDS, _gemma3_cfg, _gemma3_checks,
                                            layer_weights=gemma3_layer_weights, gemma_norms=True))


def _qwen3_cfg(c: Any) -> dict:
    return {**_llama_cfg(c), "use_qk_norm": True}


def qwen3_layer_weights(layer: nn.Module, i: int, cfg: HookedTransformerConfig
                        ) -> Iterator[tuple[str, Tensor, str | None]]:
    """Decoder layer ``i`` of Qwen3(-VL): Llama's, plus the per-head RMSNorms of queries and keys."""
    yield from llama_layer_weights(layer, i, cfg)
    yield f"blocks.{i}.attn.q_norm.w", layer.self_attn.q_norm.weight, f"layers.{i}.self_attn.q_norm.weight"
    yield f"blocks.{i}.attn.k_norm.w", layer.self_attn.k_norm.weight, f"layers.{i}.self_attn.k_norm.weight"


# Qwen3-VL's text decoder: Llama-shaped with per-head q/k RMSNorm (its interleaved M-RoPE is installed by the adapter)
register_decoder("qwen3_vl_text", DecoderSpec("Qwen3ForCausalLM", LLAMA_FIELDS | {"attention_bias"}, _qwen3_cfg,
                                              layer_weights=qwen3_layer_weights))


def decoder_spec(text_config: Any) -> DecoderSpec:
    mt = getattr(text_config, "model_type", None)
    if mt not in DECODERS:
        raise UnsupportedArchitectureError(
            f"Text decoder type {mt!r} is not supported. Supported decoder types: {sorted(DECODERS)}. "
            "Register one with modality_circuits.models.decoders.register_decoder().")
    return DECODERS[mt]


_DEFAULTS: dict[type, dict] = {}


def check_text_config(text_config: Any) -> DecoderSpec:
    """Refuse every HF config field with a non-default value that the family does not convert (names it)."""
    spec = decoder_spec(text_config)
    cls = type(text_config)
    if cls not in _DEFAULTS:
        _DEFAULTS[cls] = cls().to_dict()
    defaults = _DEFAULTS[cls]
    for field, value in text_config.to_dict().items():
        if field in spec.converted or field in IGNORED_FIELDS or field not in defaults:
            continue  # fields HF does not know are not read by HF's modeling code either
        if value != defaults[field]:
            _refuse(text_config, field, value, f"the {text_config.model_type} converter handles "
                    f"{sorted(spec.converted)}")
    spec.checks(text_config)
    return spec


def build_cfg(text_config: Any, dtype: torch.dtype, device: str | torch.device, **overrides: Any
              ) -> tuple[HookedTransformerConfig, RopeSpec | tuple[RopeSpec, ...]]:
    """``(HookedTransformerConfig, HF rotary spec)`` for an HF text config (no hub access; refuses what it cannot
    convert exactly)."""
    spec = check_text_config(text_config)
    rope = (layer_rope_specs(text_config, d_head(text_config)) if per_layer_type(text_config)
            else rope_spec(text_config, d_head(text_config)))
    d = spec.cfg_fn(text_config)
    d.update(original_architecture=spec.tl_architecture, dtype=dtype, device=str(device), n_devices=1,
             default_prepend_bos=False, tokenizer_prepends_bos=False, init_weights=False)
    d.update(overrides)
    return HookedTransformerConfig.from_dict(d), rope


# --------------------------------------------------------------------------------------------------- weights
def _kv(cfg: HookedTransformerConfig) -> tuple[str, int]:
    """(name prefix of K/V parameters, number of K/V heads): TL stores GQA K/V as ``_W_K`` … ."""
    if cfg.n_key_value_heads is not None:
        return "_", int(cfg.n_key_value_heads)
    return "", cfg.n_heads


def llama_layer_weights(layer: nn.Module, i: int, cfg: HookedTransformerConfig
                        ) -> Iterator[tuple[str, Tensor, str | None]]:
    """``(TL parameter, tensor, HF weight it comes from or None)`` for decoder layer ``i`` (Llama layout)."""
    u, n_kv = _kv(cfg)
    a, m, b = layer.self_attn, layer.mlp, f"blocks.{i}"
    h = f"layers.{i}"
    yield f"{b}.ln1.w", layer.input_layernorm.weight, f"{h}.input_layernorm.weight"
    yield f"{b}.ln2.w", layer.post_attention_layernorm.weight, f"{h}.post_attention_layernorm.weight"
    for name, proj, n in (("Q", a.q_proj, cfg.n_heads), ("K", a.k_proj, n_kv), ("V", a.v_proj, n_kv)):
        pre = "" if name == "Q" else u
        yield f"{b}.attn.{pre}W_{name}", einops.rearrange(proj.weight, "(n h) m -> n m h", n=n), \
            f"{h}.self_attn.{name.lower()}_proj.weight"
        if proj.bias is not None:
            yield f"{b}.attn.{pre}b_{name}", proj.bias.view(n, -1), f"{h}.self_attn.{name.lower()}_proj.bias"
    yield f"{b}.attn.W_O", einops.rearrange(a.o_proj.weight, "m (n h) -> n h m", n=cfg.n_heads), \
        f"{h}.self_attn.o_proj.weight"
    if a.o_proj.bias is not None:
        yield f"{b}.attn.b_O", a.o_proj.bias, f"{h}.self_attn.o_proj.bias"
    yield f"{b}.mlp.W_in", m.up_proj.weight.T, f"{h}.mlp.up_proj.weight"
    yield f"{b}.mlp.W_gate", m.gate_proj.weight.T, f"{h}.mlp.gate_proj.weight"
    yield f"{b}.mlp.W_out", m.down_proj.weight.T, f"{h}.mlp.down_proj.weight"


def hf_decoder_weights(body: nn.Module, lm_head: nn.Module) -> set[str]:
    """Names of every HF decoder weight (persistent state; ``lm_head.`` prefixed for the head)."""
    return set(body.state_dict(keep_vars=True)) | {f"lm_head.{k}" for k in lm_head.state_dict(keep_vars=True)}


@torch.no_grad()
def load_decoder(model: nn.Module, body: nn.Module, lm_head: nn.Module, free_source: bool = False,
                 exclude_prefix: str = "image_encoder.", spec: DecoderSpec | None = None) -> None:
    """Make ``model``'s decoder parameters the HF decoder's (``embed_tokens``, ``layers``, ``norm``, ``lm_head``).

    Each TransformerLens parameter becomes a rearranged *view* of an HF-layout tensor (``W_Q = q_proj.weight``
    viewed as ``[n_heads, d_model, d_head]`` …), so TransformerLens's own ``rearrange(... -> (n h) m)`` +
    ``F.linear`` in the forward read contiguous memory instead of copying every weight on every call.
    ``free_source=False`` (an HF model the caller keeps): the HF tensors are cloned first (in their layout), so
    edits to one model never reach the other. ``free_source=True`` (an HF model the loader owns): the HF tensors
    are used as they are (no second copy; memory-mapped checkpoint pages are shared) and each HF layer is dropped
    once converted. A tied ``lm_head`` is a view of ``W_E`` (one copy).

    Two-sided: every parameter of ``model`` (outside ``exclude_prefix``) gets one tensor of its shape (zero for
    biases the HF decoder does not have), and every HF weight is used. ``spec`` (the decoder family; default
    Llama's layout) gives the layer mapping and Gemma's embedding scale and ``1 + w`` norms.
    """
    cfg = model.cfg
    params = {k: p for k, p in model.named_parameters() if not k.startswith(exclude_prefix)}
    hf_names = hf_decoder_weights(body, lm_head)
    used: set[str] = set()
    filled: set[str] = set()

    def put(name: str, t: Tensor, hf: str | None) -> None:
        if name not in params:
            raise WeightConversionError(f"The converter produced {name!r}, which the HookedTransformer does not have.")
        p = params[name]
        if tuple(p.shape) != tuple(t.shape):
            raise WeightConversionError(f"{hf or name}: HF shape {tuple(t.shape)} does not fit {name} "
                                        f"{tuple(p.shape)}; the config and checkpoint disagree.")
        t = t.detach()
        if t.dtype != p.dtype or t.device != p.device:
            t = t.to(device=p.device, dtype=p.dtype)  # a new tensor; strides (HF layout) preserved
        elif not free_source:
            t = t.clone()  # preserve_format: the HF layout, in memory of our own
        mod_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(t, requires_grad=p.requires_grad))
        filled.add(name)
        if hf is not None:
            used.add(hf)

    layer_weights = (spec.layer_weights if spec is not None and spec.layer_weights else llama_layer_weights)
    gemma = spec is not None and spec.gemma_norms
    tied = lm_head.weight is body.embed_tokens.weight and not gemma
    if gemma:  # HF: embedding(ids) · sqrt(d_model) in the weights' dtype; the same product, taken once
        w = body.embed_tokens.weight.detach().to(cfg.dtype)
        put("embed.W_E", w * torch.tensor(cfg.d_model ** 0.5, dtype=torch.float32).to(cfg.dtype),
            "embed_tokens.weight")
    else:
        put("embed.W_E", body.embed_tokens.weight, "embed_tokens.weight")
    for i in range(len(body.layers)):
        for name, t, hf in layer_weights(body.layers[i], i, cfg):
            put(name, t, hf)
        if free_source:
            body.layers[i] = nn.Module()  # drop the HF layer (its tensors live on only as our views)
    put("ln_final.w", (1.0 + body.norm.weight.detach().float()) if gemma else body.norm.weight, "norm.weight")
    if tied:  # share W_E's storage instead of a second vocab x d_model copy (untie before editing either)
        model.unembed.W_U = nn.Parameter(model.embed.W_E.T, requires_grad=params["unembed.W_U"].requires_grad)
        filled.add("unembed.W_U")
        used.add("lm_head.weight")
    else:
        put("unembed.W_U", lm_head.weight.T, "lm_head.weight")
    if free_source:
        body.embed_tokens = body.norm = None
    for name, p in params.items():  # biases the HF decoder has none of are zero
        if name not in filled and name.rsplit(".", 1)[-1].startswith(("b_", "_b_")):
            p.zero_()
            filled.add(name)
    missing = sorted(set(params) - filled)
    unused = sorted(hf_names - used)
    if missing or unused:
        raise WeightConversionError(
            f"Weight conversion is not one-to-one: HookedTransformer parameters without an HF weight: {missing[:8]}; "
            f"HF decoder weights not converted: {unused[:8]}{' …' if len(unused) > 8 else ''}. The config and "
            "checkpoint disagree, or the decoder has weights this converter does not implement.")
