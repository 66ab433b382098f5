"""Exact or refused: every rope type and bias option HookedMLLM converts equals HF (fp32, eager, <= 1e-4) on LLaVA
and Qwen-VL decoders; every option it does not convert is refused with an error naming the field and value; prompts
longer than ``max_position_embeddings`` run as in HF (or are refused where HF's result is history-dependent)."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import PositionLimitError, UnsupportedArchitectureError, WeightConversionError
from modality_circuits.models.decoders import IGNORED_FIELDS, check_text_config, load_decoder
from modality_circuits.testing import random_images, tiny_llava, tiny_qwen_tokenizer, tiny_qwen_vl

ATOL = 1e-4


def perturb_vectors(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=g) * scale
                p.copy_(noise if name.endswith("bias") else 1.0 + noise)


def hf_logits(hf, batch):
    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    return hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, position_ids=pos,
              **batch.model_inputs).logits


def max_diff_on_mask(a, b, mask):
    m = mask.bool()
    return float((a[m] - b[m]).abs().max())

ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-attention-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                              "original_max_position_embeddings": 16, "attention_factor": 1.3,
                              "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}

LLAVA_OPTIONS = {
    **{f"llama-rope-{k}": dict(decoder="llama", text_overrides={"rope_parameters": v}) for k, v in ROPES.items()},
    "qwen2-rope-yarn": dict(decoder="qwen2", n_kv_heads=2, text_overrides={"rope_parameters": ROPES["yarn"]}),
    "llama-attention-bias": dict(decoder="llama", n_kv_heads=2, text_overrides={"attention_bias": True}),
    "llama-tied-embeddings": dict(decoder="llama", text_overrides={"tie_word_embeddings": True}),
    "qwen2-sliding-window-layers": dict(decoder="qwen2", n_layers=3, text_overrides={
        "use_sliding_window": True, "sliding_window": 20, "max_window_layers": 1}),
}


def _pair(tokenizer, **kw):
    hf = tiny_llava(tokenizer, **kw)
    perturb_vectors(hf)
    return hf, HookedMLLM.from_hf(hf, tokenizer)


def _check_llava(hf, model, prompts):
    batch = model.prepare(prompts)
    with torch.no_grad():
        ours = model(batch)
        ref = hf_logits(hf, batch)
    assert max_diff_on_mask(ours, ref, batch.attention_mask) < ATOL
    return batch


@pytest.mark.parametrize("name", sorted(LLAVA_OPTIONS))
def test_llava_option_equals_hf(tokenizer, prompts, name):
    hf, model = _pair(tokenizer, **LLAVA_OPTIONS[name])
    _check_llava(hf, model, prompts)
    if "attention-bias" in name:
        attn = hf.model.language_model.layers[0].self_attn
        assert torch.equal(model.blocks[0].attn.b_O, attn.o_proj.bias)
        assert torch.equal(model.blocks[0].attn.b_Q.flatten(), attn.q_proj.bias)
    if "sliding" in name:
        assert model.cfg.attn_types == ["global", "local", "local"] and model.cfg.window_size == 20
    if "tied" in name:
        assert model.unembed.W_U.data_ptr() == model.embed.W_E.data_ptr(), "tied embeddings share one copy"


def test_rope_types_change_the_logits(tokenizer, prompts):
    """The rope options above are not no-ops on these prompts (else the parity tests would prove nothing)."""
    base = tiny_llava(tokenizer, decoder="llama")
    batch = HookedMLLM.from_hf(base, tokenizer).prepare(prompts)
    with torch.no_grad():
        ref = hf_logits(base, batch)
        for name in ("linear", "yarn", "llama3"):
            other = tiny_llava(tokenizer, decoder="llama", text_overrides={"rope_parameters": ROPES[name]})
            assert max_diff_on_mask(hf_logits(other, batch), ref, batch.attention_mask) > 1e-3, name


def test_generation_with_yarn_equals_hf(tokenizer, prompts):
    hf, model = _pair(tokenizer, decoder="llama", n_kv_heads=2, text_overrides={"rope_parameters": ROPES["yarn"]})
    batch = model.prepare(prompts)
    ours = model.generate(batch, max_new_tokens=4)
    with torch.no_grad():
        ref = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask, **batch.model_inputs,
                          do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id,
                          suppress_tokens=[hf.config.image_token_id])  # HookedMLLM never emits the placeholder
    assert torch.equal(ours, ref[:, batch.seq_len:])


# ------------------------------------------------------------------------------------------------ long prompts
def test_prompt_longer_than_max_position_embeddings_equals_hf(tokenizer, prompts):
    hf, model = _pair(tokenizer, decoder="llama", text_overrides={"max_position_embeddings": 16})
    batch = _check_llava(hf, model, prompts)
    assert batch.seq_len > 3 * 16
    assert model.cfg.n_ctx == 16


def test_dynamic_rope_beyond_its_exact_range_is_refused(tokenizer, prompts):
    hf, model = _pair(tokenizer, decoder="llama", text_overrides={
        "max_position_embeddings": 100, "rope_parameters": ROPES["dynamic"]})
    short = model.prepare([[Segment("image", image=random_images(1)[0]), Segment("question", "What is the shape?")]])
    assert short.seq_len <= 100 < model.prepare(prompts).seq_len
    with torch.no_grad():
        assert max_diff_on_mask(model(short), hf_logits(hf, short), short.attention_mask) < ATOL
    with pytest.raises(PositionLimitError, match=r"needs \d+ rotary positions.*max_position_embeddings=100"):
        model(model.prepare(prompts))


# --------------------------------------------------------------------------------------------------- Qwen-VL
@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("rope", ["yarn-attention-factor", "linear", "llama3"])
def test_qwen_vl_rope_types_equal_hf(version, rope):
    from transformers import Qwen2VLImageProcessorPil

    tok = tiny_qwen_tokenizer()
    hf = tiny_qwen_vl(tok, version=version, text_overrides={"rope_parameters": ROPES[rope]})
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    model = HookedMLLM.from_hf(hf, tok, proc)
    ims = random_images(2, 32, seed=1)
    batch = model.prepare([[Segment("image", image=ims[0]), Segment("context", "Text context: red."),
                            Segment("question", "What is the color?")],
                           [Segment("image", image=ims[1]), Segment("question", "What?")]])
    mi = batch.model_inputs
    with torch.no_grad():
        ours = model(batch)
        ref = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                 mm_token_type_ids=(batch.tokens == hf.config.image_token_id).int(),
                 pixel_values=torch.cat(mi["pixel_values"]), image_grid_thw=mi["image_grid_thw"]).logits
    assert max_diff_on_mask(ours, ref, batch.attention_mask) < ATOL
    if rope == "yarn-attention-factor":
        assert model.image_encoder.rope.attention_scaling == pytest.approx(1.3)


# --------------------------------------------------------------------------------------------------- refusals
REFUSED = {
    "mlp_bias": ({"mlp_bias": True}, r"mlp_bias=True"),
    "longrope": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                      "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}},
                 r"rope_type='longrope'"),
    "partial_rotary": ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}}, r"partial_rotary_factor=0.5"),
    "hidden_act": ({"hidden_act": "quick_gelu"}, r"hidden_act='quick_gelu'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_llama_option_is_refused(tokenizer, name):
    overrides, pattern = REFUSED[name]
    hf = tiny_llava(tokenizer, decoder="llama", text_overrides=overrides)
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        HookedMLLM.from_hf(hf, tokenizer)


def test_unknown_non_default_field_is_refused_by_name(tokenizer):
    """A field HF knows but no converter declares (as a future transformers release may add) is refused when it
    is not at its default, and accepted at its default."""
    import transformers

    class FutureLlamaConfig(transformers.LlamaConfig):
        def __init__(self, attention_softcap=None, **kw):
            super().__init__(**kw)
            self.attention_softcap = attention_softcap

    tc = tiny_llava(tokenizer, decoder="llama").config.text_config
    new = FutureLlamaConfig(**tc.to_dict())
    check_text_config(new)  # at its default: accepted
    new.attention_softcap = 30.0
    with pytest.raises(UnsupportedArchitectureError, match=r"FutureLlamaConfig\.attention_softcap=30\.0"):
        check_text_config(new)
    tc.attention_dropout = 0.1  # ignorable (eval mode) and head_dim converted: accepted
    tc.head_dim = 8
    check_text_config(tc)


def test_every_hf_field_is_converted_ignored_or_default():
    """The declared field sets cover exactly the fields HF's config classes know (no typo hides a field)."""
    import transformers

    from modality_circuits.models.decoders import DECODERS

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}
    for mt, cls in classes.items():
        known = set(cls().to_dict())
        declared = DECODERS[mt].converted | set(IGNORED_FIELDS)
        assert known - declared == set(), (mt, known - declared)  # nothing silently compared to a default only


def test_unconverted_hf_weight_is_an_error(tokenizer):
    """Two-sided accounting: an HF decoder weight the converter does not use fails loudly (here an MLP bias
    slipped past the config check)."""
    hf = tiny_llava(tokenizer, decoder="llama")
    mlp = hf.model.language_model.layers[1].mlp
    mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(mlp.up_proj.out_features))
    with pytest.raises(WeightConversionError, match=r"layers\.1\.mlp\.up_proj\.bias"):
        HookedMLLM.from_hf(hf, tokenizer)


def test_free_source_releases_hf_layers_and_keeps_results(tokenizer, prompts):
    hf = tiny_llava(tokenizer, decoder="llama", n_kv_heads=2)
    perturb_vectors(hf)
    ref_model = HookedMLLM.from_hf(hf, tokenizer)
    batch = ref_model.prepare(prompts)
    with torch.no_grad():
        ref = ref_model(batch)
    model = HookedMLLM.from_hf(hf, tokenizer)
    body = hf.model.language_model
    load_decoder(model, body, hf.lm_head, free_source=True)
    assert all(len(list(layer.parameters())) == 0 for layer in body.layers) and body.embed_tokens is None
    with torch.no_grad():
        assert torch.equal(model(batch), ref)
