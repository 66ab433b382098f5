"""LLaVA-OneVision in HookedTransformer form: logits and greedy generation equal HF (fp32, eager) for a tiled image
whose grid is shrunk (anyres_max), a prompt with two images (not tiled, as HF), a padded batch with a text-only
row; knockout agrees with HF's 4-D attention-mask path; bad configs are refused."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import UnsupportedArchitectureError
from modality_circuits.interventions import knockout
from modality_circuits.testing import (
    hf_knockout_mask,
    hf_positions,
    random_images,
    tiny_bpe_tokenizer,
    tiny_llava_onevision,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    tok = tiny_bpe_tokenizer()
    hf = tiny_llava_onevision(tok)
    return hf, HookedMLLM.from_hf(hf, tok)


def _prompts():
    ims = random_images(2, size=32, seed=1)
    wide = random_images(1, size=64, seed=3)[0].resize((90, 40))
    return [[Segment("image", image=wide), Segment("question", "What is the color?")],
            [Segment("image", image=ims[0]), Segment("image", image=ims[1]), Segment("question", "the shape?")],
            [Segment("question", "What is the color of the shape?")]]


def _hf_inputs(batch):
    mi = batch.model_inputs
    if not mi:
        return {}
    return dict(pixel_values=torch.cat(mi["pixel_values"]), image_sizes=mi["image_sizes"],
                batch_num_images=torch.tensor([c for c in batch.image_counts if c]))


def _hf_logits(hf, batch, **kw):
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=kw.pop("attention_mask", batch.attention_mask),
                  position_ids=hf_positions(batch), **_hf_inputs(batch)).logits


@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["tiled_and_shrunk", "two_images_not_tiled",
                                                            "padded_batch_with_text_only_row"])
def test_logits_equal_hf(pair, rows):
    hf, model = pair
    batch = model.prepare([_prompts()[i] for i in rows])
    m = batch.attention_mask.bool()
    with torch.no_grad():
        assert (model(batch) - _hf_logits(hf, batch)).abs()[m].max() < TOL


def test_layout_follows_the_number_of_images(pair):
    _, model = pair
    batch = model.prepare(_prompts())
    c = batch.spans.counts()
    assert [t.shape[0] for t in batch.model_inputs["pixel_values"]] == [7, 1, 1]  # a 2x3 grid + base; base only
    # the 90x40 image: 2x3 tiles of 4x4 = 8x12, unpadded to 5x12 = 60 > 2 tiles' worth (32): shrunk to 4x8
    assert c["image.0.grid"] == [32, 0, 0] and c["image.0.newline"] == [4, 1, 0]
    assert c["image.0"] == [52, 17, 0] and c["image.1"] == [0, 17, 0]


def test_generation_and_knockout_equal_hf(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    ours = model.generate(batch, max_new_tokens=5)
    theirs = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask, **_hf_inputs(batch),
                         max_new_tokens=5, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.tolist() == theirs[:, batch.tokens.shape[1]:].tolist()
    with knockout(model, batch.spans, "image.0.grid", "last", range(model.cfg.n_layers), allow_empty=True):
        ko = model(batch)
    mask4 = hf_knockout_mask(batch, "image.0.grid", "last", allow_empty=True)
    assert (ko[:, -1] - _hf_logits(hf, batch, attention_mask=mask4)[:, -1]).abs().max() < TOL
    assert (ko[0, -1] - model(batch)[0, -1]).abs().max() > 1e-4


def test_bad_configs_are_refused():
    tok = tiny_bpe_tokenizer()
    hf = tiny_llava_onevision(tok)
    hf.config.vision_aspect_ratio = "anyres"
    with pytest.raises(UnsupportedArchitectureError, match="vision_aspect_ratio='anyres'"):
        HookedMLLM.from_hf(hf, tok)
    hf = tiny_llava_onevision(tok)
    hf.config.vision_feature_select_strategy = "default"  # would drop a real SigLIP patch: no full tile grid
    with pytest.raises(UnsupportedArchitectureError, match="15 tokens per tile"):
        HookedMLLM.from_hf(hf, tok)
