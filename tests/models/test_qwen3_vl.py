"""Qwen3-VL's two differences from Qwen2-VL (the shared behaviour, logits, generation, knockout and the prefix-cached
sweep, is tested for all three versions in test_qwen2_vl.py): the interleaved M-RoPE layout equals HF's
``recomposition_frequencies``, and DeepStack is an explicit injection at ``blocks.k.hook_deepstack`` that equals
HF's ``_deepstack_process`` (ablating it equals HF without DeepStack)."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import ImageTokenMismatchError
from modality_circuits.models.qwen2_vl import mrope_axes
from modality_circuits.testing import random_images, tiny_qwen_tokenizer, tiny_qwen_vl

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    from transformers import Qwen2VLImageProcessorPil

    tok = tiny_qwen_tokenizer()
    hf = tiny_qwen_vl(tok, version="3")
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    return hf, HookedMLLM.from_hf(hf, tok, proc)


def _batch(model):
    ims = random_images(2, 32, seed=1)
    return model.prepare([[Segment("image", image=ims[0]), Segment("question", "What is the color?")],
                          [Segment("image", image=ims[1].resize((24, 32))), Segment("question", "the shape?")]])


def _hf_logits(hf, batch):
    mi = batch.model_inputs
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                  pixel_values=torch.cat(list(mi["pixel_values"])), image_grid_thw=mi["image_grid_thw"],
                  mm_token_type_ids=(batch.tokens == hf.config.image_token_id).int()).logits


@pytest.mark.parametrize("sections", [[24, 20, 20], [2, 3, 3], [16, 24, 24]])
def test_interleaved_axes_equal_hf_recomposition(sections):
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    half = sum(sections)
    rot = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(head_dim=2 * half, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}))
    marker = torch.arange(3, dtype=torch.float)[:, None, None, None].expand(3, 1, 1, half).clone()
    assert rot.recomposition_frequencies(marker)[0, 0, :half].long().tolist() == mrope_axes(sections, True).tolist()
    assert mrope_axes(sections).tolist() == sum(([i] * s for i, s in enumerate(sections)), [])  # chunked (Qwen2)


def test_deepstack_is_a_hookable_injection(pair):
    hf, model = pair
    batch = _batch(model)
    assert model.image_encoder.deepstack_layers == 2
    m = batch.attention_mask.bool()
    seen = {}
    names = [f"blocks.{k}.hook_deepstack" for k in range(2)]
    with torch.no_grad():
        ours, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    assert (ours - _hf_logits(hf, batch))[m].abs().max() < TOL
    n_img = int(batch.spans.mask("image").sum())
    assert all(tuple(cache[n].shape) == (n_img, model.cfg.d_model) for n in names)
    # ablating the injection at every block equals HF without DeepStack
    def zero(x, hook):
        seen[hook.name] = tuple(x.shape)
        return torch.zeros_like(x)

    with torch.no_grad():
        ablated = model.run_with_hooks(batch, fwd_hooks=[(n, zero) for n in names])
    lm = hf.model.language_model
    original = lm._deepstack_process
    lm._deepstack_process = lambda hidden, mask, embeds: hidden
    try:
        no_ds = _hf_logits(hf, batch)
    finally:
        lm._deepstack_process = original
    assert set(seen) == set(names) and (ablated - no_ds)[m].abs().max() < TOL
    assert (ablated - ours)[m].abs().max() > 1e-3


def test_runs_from_a_layer_need_the_deepstack_features(pair):
    _, model = pair
    batch = _batch(model)
    with torch.no_grad():
        want, cache = model.run_with_cache(batch, names_filter="blocks.1.hook_resid_pre")
        got = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=batch.attention_mask,
                    **model.prompt_context(batch))  # block 1 still adds its DeepStack features
    assert (got - want).abs().max() < 1e-5
    with pytest.raises(ImageTokenMismatchError, match="DeepStack"):
        model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=batch.attention_mask,
              rope_positions=batch.rope_positions)
