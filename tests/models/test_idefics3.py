"""Idefics3 and SmolVLM in HookedTransformer form: logits and greedy generation equal HF (fp32, eager) for a split
image, a prompt with two images, a left-padded batch with a text-only row; the prompt text equals the HF processor's
(tile tags, newlines, global view); tiles are token groups; knockout agrees with HF's 4-D attention-mask path."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import ImageTokenMismatchError
from modality_circuits.interventions import knockout
from modality_circuits.testing import (
    hf_knockout_mask,
    hf_positions,
    random_images,
    tiny_bpe_tokenizer,
    tiny_idefics3,
    tiny_idefics3_tokenizer,
)

TOL = 1e-4


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def pair(request):
    tok = tiny_idefics3_tokenizer()
    hf = tiny_idefics3(tok, smolvlm=request.param == "smolvlm")
    return hf, HookedMLLM.from_hf(hf, tok)


def _prompts():
    ims = random_images(2, size=32, seed=1)
    wide = random_images(1, size=64, seed=3)[0].resize((90, 40))
    return [[Segment("image", image=wide), Segment("question", "What is the color?")],
            [Segment("image", image=ims[0]), Segment("image", image=ims[1]), Segment("question", "the shape?")],
            [Segment("question", "What is the color of the shape?")]]


def _hf_inputs(batch):
    """HF's layout: per prompt all tiles of its images, zero-padded to the batch's largest tile count."""
    mi, k, per = batch.model_inputs, 0, []
    if not mi:
        return {}
    for c in batch.image_counts:
        per.append((torch.cat(mi["pixel_values"][k:k + c]), torch.cat(mi["pixel_attention_mask"][k:k + c]))
                   if c else None)
        k += c
    n = max(p[0].shape[0] for p in per if p is not None)
    size = mi["pixel_values"][0].shape[-2:]
    pv, pm = torch.zeros(len(per), n, 3, *size), torch.zeros(len(per), n, *size, dtype=torch.bool)
    for i, p in enumerate(per):
        if p is not None:
            pv[i, :p[0].shape[0]], pm[i, :p[0].shape[0]] = p
    return {"pixel_values": pv, "pixel_attention_mask": pm}


def _hf_logits(hf, batch, **kw):
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=kw.pop("attention_mask", batch.attention_mask),
                  position_ids=hf_positions(batch), **_hf_inputs(batch)).logits


@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["split_image", "two_images",
                                                            "padded_batch_with_text_only_row"])
def test_logits_equal_hf(pair, rows):
    hf, model = pair
    batch = model.prepare([_prompts()[i] for i in rows])
    m = batch.attention_mask.bool()
    with torch.no_grad():
        assert (model(batch) - _hf_logits(hf, batch)).abs()[m].max() < TOL


def test_prompt_text_equals_the_hf_processor_expansion(pair):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string  # = Idefics3 processor

    _, model = pair
    batch = model.prepare(_prompts()[:1])
    info = model.image_encoder.image_processor(images=[[_prompts()[0][0].image]], return_row_col_info=True)
    rows, cols = int(info["rows"][0][0]), int(info["cols"][0][0])
    n = batch.model_inputs["pixel_values"][0].shape[0]
    assert (rows, cols, n) == (2, 4, 9)  # the 90x40 image: 2 x 4 tiles and the global view
    expected = get_image_prompt_string(rows, cols, 16, "<fake_token_around_image>", "<image>", "<global-img>")
    assert expected in batch.texts[0]
    c = batch.spans.counts()
    assert c["image.0.global"] == [16] and c[f"image.0.tile.{rows}_{cols}"] == [16]
    assert c["image.0"] == [16 * n] and c["image_tags"][0] > 2 * n  # a tag per tile, newlines, the global tags
    assert (batch.tokens[batch.spans.mask("image_tags")] != model.image_encoder.image_token_id).all()


def test_generation_and_knockout_equal_hf(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    ours = model.generate(batch, max_new_tokens=5)
    theirs = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask, **_hf_inputs(batch),
                         max_new_tokens=5, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.tolist() == theirs[:, batch.tokens.shape[1]:].tolist()
    with knockout(model, batch.spans, "image.0.global", "last", range(model.cfg.n_layers)):
        ko = model(batch)
    mask4 = hf_knockout_mask(batch, "image.0.global", "last")
    assert (ko[:, -1] - _hf_logits(hf, batch, attention_mask=mask4)[:, -1]).abs().max() < TOL
    assert (ko[:, -1] - model(batch)[:, -1]).abs().max() > 1e-4


def test_bad_input(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:1])
    mi = batch.model_inputs
    with pytest.raises(ImageTokenMismatchError):  # one tile of features missing
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=[mi["pixel_values"][0][1:]],
              pixel_attention_mask=[mi["pixel_attention_mask"][0][1:]])
    with pytest.raises(ImageTokenMismatchError, match="PIL"):
        model.prepare([[Segment("image", image=torch.zeros(3, 32, 32))]])
    plain = tiny_bpe_tokenizer()
    with pytest.raises(ImageTokenMismatchError, match="fake_token_around_image"):
        HookedMLLM.from_hf(tiny_idefics3(plain), plain)
