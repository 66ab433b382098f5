"""HookedMLLM reproduces HF ``LlavaForConditionalGeneration`` (fp32, eager): logits, generation, loading.

Tiny random configs cover MHA/GQA, the vision-feature options (layer -1, -2, a list; ``default``/``full``
strategy) and the Llama, Mistral and Qwen2 decoders (Qwen2 with q/k/v biases). Every batch is left-padded
and holds a prompt with two images. HF gets ``position_ids`` from the attention mask, as HookedMLLM uses.
"""

from __future__ import annotations

import json

import pytest
import torch

from modality_circuits import ChatTemplate, HookedMLLM, Segment
from modality_circuits.models.llava import LlavaAdapter

CONFIGS = {
    "llama-mha-layer-2-default": dict(decoder="llama", vision_feature_layer=-2),
    "llama-gqa-layer-1-default": dict(decoder="llama", n_kv_heads=2, vision_feature_layer=-1),
    "llama-mha-layers[-2,-1]-full": dict(decoder="llama", vision_feature_layer=[-2, -1],
                                         vision_feature_select_strategy="full"),
    "llama-gqa-layers[-2,-1]-default": dict(decoder="llama", n_kv_heads=2, vision_feature_layer=[-2, -1]),
    "mistral-gqa-layer-1-full": dict(decoder="mistral", n_kv_heads=2, vision_feature_layer=-1,
                                     vision_feature_select_strategy="full"),
    "mistral-mqa-sliding-window": dict(decoder="mistral", n_kv_heads=1, sliding_window=24),
    "qwen2-gqa-layer-2-default": dict(decoder="qwen2", n_kv_heads=2, vision_feature_layer=-2),
    "qwen2-mha-layers[-2,-1]-full": dict(decoder="qwen2", vision_feature_layer=[-2, -1],
                                         vision_feature_select_strategy="full"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, make_pair):
    return make_pair(**CONFIGS[request.param])


def test_logits_equal_hf_padded_batch_with_two_images(pair, prompts, helpers):
    hf, model = pair
    batch = model.prepare(prompts)
    assert batch.image_counts == [2, 1]
    assert (batch.attention_mask == 0).any()
    with torch.no_grad():
        ours = model(batch)
    ref = helpers.hf_logits(hf, batch)
    assert ours.shape == ref.shape == (2, batch.seq_len, hf.config.text_config.vocab_size)
    assert helpers.max_diff_on_mask(ours, ref, batch.attention_mask) < helpers.ATOL
    assert torch.isfinite(ours).all()


def test_logits_equal_hf_single_prompt(pair, prompts, helpers):
    hf, model = pair
    batch = model.prepare(prompts[:1])
    assert batch.attention_mask.all()
    with torch.no_grad():
        ours = model(batch)
        ref = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, **batch.model_inputs).logits
    assert float((ours - ref).abs().max()) < helpers.ATOL


def test_image_token_count_follows_config(pair, prompts):
    hf, model = pair
    vc = hf.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + (hf.config.vision_feature_select_strategy == "full")
    assert model.image_encoder.tokens_per_image == n
    batch = model.prepare(prompts)
    assert batch.spans.counts()["image.0"] == [n, n]
    assert batch.spans.counts()["image.1"] == [n, 0]
    with torch.no_grad():
        feats = model.image_encoder.encode_images(**batch.model_inputs)
        ref = hf.model.get_image_features(pixel_values=batch.model_inputs["pixel_values"],
                                          vision_feature_layer=hf.config.vision_feature_layer,
                                          vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
                                          return_dict=True).pooler_output
    assert feats.shape == (3 * n, model.cfg.d_model)
    assert torch.allclose(feats, torch.cat(list(ref)), atol=1e-6)


def test_decoder_config_converted(pair):
    hf, model = pair
    tc = hf.config.text_config
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab) == (
        tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.intermediate_size, tc.vocab_size)
    kv = cfg.n_key_value_heads or cfg.n_heads
    assert kv == tc.num_key_value_heads
    window = getattr(tc, "sliding_window", None)
    if tc.model_type == "mistral" and window:
        assert cfg.window_size == window and cfg.attn_types == ["local"] * cfg.n_layers
    if tc.model_type == "qwen2":
        b_q = model.blocks[0].attn.b_Q
        assert b_q.abs().sum() > 0, "Qwen2 q/k/v biases must be carried over"
        assert torch.allclose(b_q.flatten(), hf.model.language_model.layers[0].self_attn.q_proj.bias)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", ["llama-gqa-layer-1-default", "qwen2-gqa-layer-2-default"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_equals_hf(make_pair, prompts, name, use_cache):
    hf, model = make_pair(**CONFIGS[name])
    batch = model.prepare(prompts)
    ours = model.generate(batch, max_new_tokens=5, use_past_kv_cache=use_cache)
    with torch.no_grad():
        ref = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask, **batch.model_inputs,
                          do_sample=False, max_new_tokens=5, pad_token_id=model.tokenizer.pad_token_id)
    new = ref[:, batch.seq_len:]
    assert ours.shape == (2, 5)
    assert torch.equal(ours, new), (ours, new)


def test_generate_from_prompt_strings(model, images):
    prompt = "USER: <image>\nWhat is the color of the shape? ASSISTANT:"
    batch = model.prepare([prompt], images=[[images[0]]])
    assert batch.texts[0].count("<image>") == model.image_encoder.tokens_per_image
    toks = model.generate(batch, max_new_tokens=3)
    strs = model.generate(prompt, images=[images[0]], max_new_tokens=3, return_type="str")
    assert strs == model.tokenizer.batch_decode(toks, skip_special_tokens=True)


def test_prompt_string_input_equals_segments(model, images, helpers):
    text = "USER: <image>\nWhat is the color of the shape? ASSISTANT:"
    with torch.no_grad():
        a = model(text, images=[images[0]])
    b = model.prepare([[Segment("image", image=images[0]), Segment("question", "What is the color of the shape?")]],
                      template=ChatTemplate(system="", user_prefix="USER: ", sep=" ", image_sep="\n",
                                            assistant_prefix=" ASSISTANT:"))
    assert b.texts[0].replace("<image>", "") == text.replace("<image>", "")
    with torch.no_grad():
        c = model(b)
    assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ loading
def test_from_pretrained_round_trip(tmp_path, make_pair, tokenizer, prompts, helpers):
    hf, model = make_pair(**CONFIGS["qwen2-gqa-layer-2-default"])
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model.image_encoder.image_processor.save_pretrained(tmp_path)
    template = dict(system="", user_prefix="USER: ", sep=" ", image_sep="\n", assistant_prefix=" ASSISTANT:")
    (tmp_path / "prompt_template.json").write_text(json.dumps(template))
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))

    loaded = HookedMLLM.from_pretrained(tmp_path)
    assert isinstance(loaded.image_encoder, LlavaAdapter)
    assert loaded.template.system == "" and loaded.template.user_prefix == "USER: "
    assert loaded.source == str(tmp_path.resolve())
    assert loaded.cfg.dtype == torch.float32
    batch = loaded.prepare(prompts)
    assert torch.equal(batch.tokens, model.prepare(prompts, template=loaded.template).tokens)
    assert torch.equal(batch.model_inputs["pixel_values"],
                       model.prepare(prompts).model_inputs["pixel_values"])
    with torch.no_grad():
        ours = loaded(batch)
    ref = helpers.hf_logits(hf, batch)
    assert helpers.max_diff_on_mask(ours, ref, batch.attention_mask) < helpers.ATOL
