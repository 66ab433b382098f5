"""InternVL (InternVL3 layout) in HookedTransformer form: logits and greedy generation equal HF (fp32, eager) for one
image, two images with different tile counts, a left-padded batch with a text-only row; tiles and the thumbnail are
token groups of their own; knockout agrees with HF's 4-D attention-mask path; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import ImageTokenMismatchError, ModalityCircuitsError
from modality_circuits.interventions import knockout
from modality_circuits.testing import (
    hf_knockout_mask,
    hf_positions,
    random_images,
    tiny_bpe_tokenizer,
    tiny_internvl,
    tiny_internvl_tokenizer,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    tok = tiny_internvl_tokenizer()
    hf = tiny_internvl(tok)
    return hf, HookedMLLM.from_hf(hf, tok)


def _wide(seed: int = 3):
    """A 3:1 image: three tiles plus the thumbnail."""
    return random_images(1, size=64, seed=seed)[0].resize((96, 32))


def _prompts():
    ims = random_images(2, size=32, seed=1)
    return [[Segment("image", image=ims[0]), Segment("question", "What is the color?")],
            [Segment("image", image=_wide()), Segment("image", image=ims[1]), Segment("question", "the shape?")],
            [Segment("question", "What is the color of the shape?")]]


def _hf_logits(hf, batch, **kw):
    pos = kw.pop("position_ids", hf_positions(batch))
    extra = {}
    if batch.model_inputs.get("pixel_values"):
        extra["pixel_values"] = torch.cat(batch.model_inputs["pixel_values"])
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=kw.pop("attention_mask", batch.attention_mask),
                  position_ids=pos, **extra).logits


@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["one_image", "two_images_4_and_1_tiles",
                                                            "padded_batch_with_text_only_row"])
def test_logits_equal_hf(pair, rows):
    hf, model = pair
    batch = model.prepare([_prompts()[i] for i in rows])
    m = batch.attention_mask.bool()
    with torch.no_grad():
        diff = (model(batch) - _hf_logits(hf, batch)).abs()[m].max()
    assert diff < TOL


def test_tiles_and_thumbnail_are_groups(pair):
    _, model = pair
    batch = model.prepare(_prompts())
    assert [t.shape[0] for t in batch.model_inputs["pixel_values"]] == [1, 4, 1]
    c = batch.spans.counts()
    assert c["image.0.tile.0"] == [16, 16, 0]  # per sample: image N is its N-th image
    assert c["image.0"] == [16, 64, 0] and c["image.1"] == [0, 16, 0] and c["image"] == [16, 80, 0]
    assert c["image.0.tile.2"] == [0, 16, 0] and c["image.0.thumbnail"] == [0, 16, 0]
    toks = model.to_str_tokens(batch, 0)
    off = int((~batch.attention_mask[0].bool()).sum())
    img = batch.spans.positions("image", 0)
    assert toks[int(img.min()) - 1 - off] == "<img>" and toks[int(img.max()) + 1 - off] == "</img>"


def test_generation_equals_hf(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    ours = model.generate(batch, max_new_tokens=5)
    theirs = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                         pixel_values=torch.cat(batch.model_inputs["pixel_values"]), max_new_tokens=5,
                         do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.tolist() == theirs[:, batch.tokens.shape[1]:].tolist()


def test_knockout_matches_hf_attention_mask(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    clean = model(batch)
    with knockout(model, batch.spans, "image.0.thumbnail", "last", range(model.cfg.n_layers), allow_empty=True):
        ko = model(batch)
    assert (ko[1, -1] - clean[1, -1]).abs().max() > 1e-3 and (ko[0, -1] - clean[0, -1]).abs().max() == 0
    mask4 = hf_knockout_mask(batch, "image.0.thumbnail", "last", allow_empty=True)
    theirs = _hf_logits(hf, batch, attention_mask=mask4)
    assert (ko[:, -1] - theirs[:, -1]).abs().max() < TOL


def test_bad_input(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    tiles = batch.model_inputs["pixel_values"]
    with pytest.raises(ImageTokenMismatchError):  # 5 tiles of features for 6 tiles of placeholders
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=[tiles[0], tiles[1][:3]])
    with pytest.raises(ImageTokenMismatchError, match="vision tower expects"):
        model.prepare([[Segment("image", image=torch.zeros(1, 3, 48, 48))]])
    with pytest.raises(ModalityCircuitsError, match="one-tile images only"):
        model.image_encoder.image_grid(batch.model_inputs, 1)
    plain = tiny_bpe_tokenizer(image_token="<IMG_CONTEXT>")  # no <img> / </img>
    with pytest.raises(ImageTokenMismatchError, match="<img>"):
        HookedMLLM.from_hf(tiny_internvl(plain), plain)
