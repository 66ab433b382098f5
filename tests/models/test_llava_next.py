"""LLaVA-NeXT (anyres) in HookedTransformer form: logits and greedy generation equal HF (fp32, eager) for one image,
two images of different aspect ratios, a left-padded batch with a text-only row; the base tile, the unpadded grid
and the newline tokens are token groups; knockout agrees with HF's 4-D attention-mask path; bad input fails."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import ImageTokenMismatchError, UnsupportedArchitectureError
from modality_circuits.interventions import knockout
from modality_circuits.testing import hf_knockout_mask, hf_positions, random_images, tiny_bpe_tokenizer, tiny_llava_next

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    tok = tiny_bpe_tokenizer()
    hf = tiny_llava_next(tok)
    return hf, HookedMLLM.from_hf(hf, tok)


def _prompts():
    ims = random_images(2, size=32, seed=1)
    wide = random_images(1, size=64, seed=3)[0].resize((90, 40))  # unpadding removes rows of the 2x1 grid
    return [[Segment("image", image=ims[0]), Segment("question", "What is the color?")],
            [Segment("image", image=wide), Segment("image", image=ims[1]), Segment("question", "the shape?")],
            [Segment("question", "What is the color of the shape?")]]


def _hf_logits(hf, batch, **kw):
    mi = batch.model_inputs
    extra = dict(pixel_values=torch.cat(mi["pixel_values"]), image_sizes=mi["image_sizes"]) if mi else {}
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=kw.pop("attention_mask", batch.attention_mask),
                  position_ids=hf_positions(batch), **extra).logits


@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["one_image", "two_images_different_aspect",
                                                            "padded_batch_with_text_only_row"])
def test_logits_equal_hf(pair, rows):
    hf, model = pair
    batch = model.prepare([_prompts()[i] for i in rows])
    m = batch.attention_mask.bool()
    with torch.no_grad():
        assert (model(batch) - _hf_logits(hf, batch)).abs()[m].max() < TOL


def test_layout_groups(pair):
    _, model = pair
    batch = model.prepare(_prompts())
    c = batch.spans.counts()
    # both go onto the 32x64 canvas (a 1x2 grid of 4x4-token tiles, 4 rows of 8): the 90x40 image fills it, the
    # square one fills half, and unpadding drops the empty columns (4 rows of 4); one newline token per row
    assert c["image.0.base"] == [16, 16, 0] and c["image.0.newline"] == [4, 4, 0]
    assert c["image.0.grid"] == [16, 32, 0] and c["image.1.grid"] == [0, 16, 0]
    assert c["image"] == [a + b for a, b in zip(c["image.0"], c["image.1"])]
    newline = batch.spans.positions("image.0.newline", 0)
    grid = batch.spans.positions("image.0.grid", 0)
    assert int(newline.max()) == int(batch.spans.positions("image.0", 0).max())  # a newline ends the last row
    assert (newline.diff() == 5).all() and int(grid.min()) == int(batch.spans.positions("image.0.base", 0).max()) + 1


def test_generation_equals_hf(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    ours = model.generate(batch, max_new_tokens=5)
    mi = batch.model_inputs
    theirs = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                         pixel_values=torch.cat(mi["pixel_values"]), image_sizes=mi["image_sizes"],
                         max_new_tokens=5, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.tolist() == theirs[:, batch.tokens.shape[1]:].tolist()


def test_knockout_matches_hf_attention_mask(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    clean = model(batch)
    with knockout(model, batch.spans, "image.0.newline", "last", range(model.cfg.n_layers)):
        ko = model(batch)
    assert (ko[:, -1] - clean[:, -1]).abs().max() > 1e-4
    mask4 = hf_knockout_mask(batch, "image.0.newline", "last")
    assert (ko[:, -1] - _hf_logits(hf, batch, attention_mask=mask4)[:, -1]).abs().max() < TOL


def test_bad_input(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    mi = batch.model_inputs
    with pytest.raises(ImageTokenMismatchError):  # the second image's tiles missing
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=mi["pixel_values"][:1],
              image_sizes=mi["image_sizes"][:1])
    with pytest.raises(ImageTokenMismatchError, match="PIL"):
        model.prepare([[Segment("image", image=torch.zeros(3, 32, 32))]])
    tok = tiny_bpe_tokenizer()
    full = tiny_llava_next(tok)
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedArchitectureError, match="vision_feature_select_strategy='full'"):
        HookedMLLM.from_hf(full, tok)
