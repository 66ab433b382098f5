"""Gemma 3 in HookedTransformer form: logits and greedy generation equal HF (fp32, eager, with ``token_type_ids``) for
one image, two images, a left-padded batch with a text-only row, and pan-and-scan crops; image tokens attend to each
other both ways (the HookedTransformer's own mask), composed with sliding windows, per-layer-type rotary and
soft-capping fields (which HF's multimodal Gemma 3 ignores); knockout equals HF's 4-D mask path; the prefix-cached
engine never splits an image block; bad input is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.engine import CleanRun, run
from modality_circuits.errors import ImageTokenMismatchError
from modality_circuits.interventions import Knockout, edge_mask, knockout
from modality_circuits.metrics import as_metric
from modality_circuits.testing import (
    hf_positions,
    random_images,
    tiny_bpe_tokenizer,
    tiny_gemma3,
    tiny_gemma3_tokenizer,
)

TOL = 1e-4
SEED = 2  # a random init whose greedy generations are not one repeated token, so that they compare something


@pytest.fixture(scope="module", params=["linear_rope", "softcap_fields"])
def pair(request):
    """``softcap_fields``: the config sets both soft-capping fields, which HF's multimodal Gemma 3 does not apply;
    parity with HF shows the converter does not apply them either."""
    tok = tiny_gemma3_tokenizer()
    hf = (tiny_gemma3(tok, seed=SEED) if request.param == "linear_rope"
          else tiny_gemma3(tok, seed=SEED, linear_factor=None, softcap=5.0))
    return hf, HookedMLLM.from_hf(hf, tok)


def _prompts():
    ims = random_images(2, size=32, seed=1)
    return [[Segment("image", image=ims[0]), Segment("question", "What is the color?")],
            [Segment("image", image=ims[0]), Segment("image", image=ims[1]), Segment("question", "the shape?")],
            [Segment("question", "What is the color of the shape?")]]


def _hf_inputs(model, batch):
    tt = (batch.tokens == model.image_encoder.image_token_id).long()
    mi = batch.model_inputs
    return {"token_type_ids": tt, **({"pixel_values": torch.cat(list(mi["pixel_values"]))} if mi else {})}


def _hf_logits(hf, model, batch, **kw):
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=kw.pop("attention_mask", batch.attention_mask),
                  position_ids=hf_positions(batch), **{**_hf_inputs(model, batch), **kw}).logits


def _hf_masks(hf, model, batch):
    """HF's own full / sliding 4-D masks of the batch (causal OR image block, window, padding)."""
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    tt = _hf_inputs(model, batch)["token_type_ids"]
    emb = hf.model.get_input_embeddings()(batch.tokens)
    return create_masks_for_vision_model(
        config=hf.config.text_config, inputs_embeds=emb, attention_mask=batch.attention_mask, past_key_values=None,
        position_ids=hf_positions(batch), block_sequence_ids=get_block_sequence_ids_for_mask(tt))


@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["one_image", "two_images",
                                                            "padded_batch_with_text_only_row"])
def test_logits_equal_hf(pair, rows):
    hf, model = pair
    batch = model.prepare([_prompts()[i] for i in rows])
    m = batch.attention_mask.bool()
    with torch.no_grad():
        ours = model(batch)
    assert (ours - _hf_logits(hf, model, batch)).abs()[m].max() < TOL
    # the bidirectional blocks matter: HF's causal fallback (no token_type_ids) gives other logits
    causal = _hf_logits(hf, model, batch, token_type_ids=None)
    assert (ours - causal).abs()[m].max() > 1e-3


def test_image_blocks_are_bidirectional_within_the_window(pair):
    _, model = pair
    batch = model.prepare(_prompts()[1:2])
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    img = (batch.tokens[0] == model.image_encoder.image_token_id).nonzero().flatten()
    first, second = img[:16], img[16:]
    w = model.cfg.window_size
    assert len(first) > w  # the window is shorter than an image: windows and blocks meet
    for layer, kind in enumerate(model.cfg.attn_types):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q, k]
        q0, q1 = int(first[0]), int(first[-1])
        assert (pat[:, q0, first].sum(0) > 0).all()  # the first image token sees all of its block (HF's window
        assert pat[:, q0, second].abs().max() == 0  # only limits how far back a key lies), not the next block
        seen = pat[:, q1, first].sum(0) > 0  # the last one sees back only within a sliding layer's window
        expect = q1 - first < w if kind == "local" else torch.ones_like(first, dtype=torch.bool)
        assert torch.equal(seen, expect)


def test_generation_equals_hf(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:3])
    ours = model.generate(batch, max_new_tokens=5)
    theirs = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask, **_hf_inputs(model, batch),
                         max_new_tokens=5, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.tolist() == theirs[:, batch.seq_len:].tolist()
    assert len({t for row in ours.tolist() for t in row}) > 2


def _half_image(batch):
    """The second half of image 0's tokens (a group inside a bidirectional block)."""
    m = batch.spans.mask("image.0").clone()
    for i in range(m.shape[0]):
        idx = m[i].nonzero().flatten()
        m[i, idx[: len(idx) // 2]] = False
    return m


@pytest.mark.parametrize("src,dst", [("image.0", "last"), ("half", "first_half")],
                         ids=["image_to_last", "inside_the_image_block"])
def test_knockout_equals_hf_4d_masks(pair, src, dst):
    """``inside_the_image_block``: the first half of an image may no longer look ahead at the second half (keys
    only the bidirectional block made visible): the knockout composes with the block mask."""
    hf, model = pair
    batch = model.prepare(_prompts()[:2])
    if src == "half":
        src = _half_image(batch)
        dst = batch.spans.mask("image.0") & ~src
    with knockout(model, batch.spans, src, dst, range(model.cfg.n_layers)):
        ko = model(batch)
    cut = edge_mask(batch.spans, src, dst)[:, None]
    masks = {k: v.masked_fill(cut, torch.finfo(torch.float32).min) for k, v in _hf_masks(hf, model, batch).items()}
    ref = _hf_logits(hf, model, batch, attention_mask=masks)
    m = batch.attention_mask.bool()
    assert (ko - ref).abs()[m].max() < TOL
    assert (ko[:, -1] - model(batch)[:, -1]).abs().max() > 1e-4


def test_engine_prefix_never_splits_an_image_block(pair):
    _, model = pair
    batch = model.prepare(_prompts()[:2])
    half = _half_image(batch)
    p0 = int(half.nonzero()[:, 1].min())  # inside image 0 of the row where that image starts first
    row = int(half[:, p0].nonzero()[0])
    assert model.prefix_boundary(batch, p0) == int(batch.spans.mask("image.0")[row].nonzero().min()) < p0
    assert model.prefix_boundary(batch, int(batch.spans.first("question"))) == int(batch.spans.first("question"))
    clean = CleanRun.record(model, batch)
    ahead = Knockout(half, batch.spans.mask("image.0") & ~half, [1, 2])  # keys only the block makes visible
    assert ahead.first_position(batch) == batch.spans.first("image.0")
    configs = [Knockout(half, "image.0", [1, 2]), Knockout("question", "last", 2), ahead]
    metric = as_metric("logit_diff", answers=[("blue", "red")] * len(batch))
    cached = run(model, clean, configs, metric, prefix=True)
    plain = run(model, clean, configs, metric, prefix=False)
    assert (cached - plain).abs().max() < 1e-5
    assert (cached[2] - run(model, clean, [()], metric)[0]).abs().max() > 1e-4


def test_pan_and_scan_crops_follow_the_hf_processor():
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tiny_gemma3_tokenizer()
    hf = tiny_gemma3(tok, seed=SEED)
    proc = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=True,
                                   pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=3,
                                   pan_and_scan_min_ratio_to_activate=1.2)
    model = HookedMLLM.from_hf(hf, tok, proc)
    wide = random_images(1, size=64, seed=3)[0].resize((96, 32))
    square = random_images(1, size=32, seed=4)[0]
    batch = model.prepare([[Segment("image", image=wide), Segment("image", image=square),
                            Segment("question", "What is the color?")],
                           [Segment("question", "What is the color of the shape?")]])  # padded, text only
    assert batch.model_inputs["num_crops"].tolist() == [3, 0]  # two images, different view counts
    tok.boi_token, tok.eoi_token, tok.image_token = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    tok.boi_token_id = tok.convert_tokens_to_ids("<start_of_image>")
    hf_proc = Gemma3Processor(image_processor=proc, tokenizer=tok, image_seq_length=16)
    expected = hf_proc.replace_image_token({"num_crops": [3]}, 0)
    assert expected in batch.texts[0]
    counts = batch.spans.counts()
    assert counts["image.0.original"][0] == 16 and counts["image.0.crop.3"][0] == 16 and counts["image.0"][0] == 64
    assert counts["image.1"][0] == 16 and hf_proc.full_image_sequence in batch.texts[0].split(expected)[1]
    m = batch.attention_mask.bool()
    with torch.no_grad():
        assert (model(batch) - _hf_logits(hf, model, batch)).abs()[m].max() < TOL


def test_bad_input(pair):
    hf, model = pair
    batch = model.prepare(_prompts()[:1])
    pv = batch.model_inputs["pixel_values"]
    with pytest.raises(ImageTokenMismatchError, match="token_type_ids"):  # HF would silently go causal
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=pv)
    wrong = (batch.tokens == model.image_encoder.image_token_id).long()
    wrong[0, -1] = 1
    with pytest.raises(ImageTokenMismatchError, match="disagrees"):
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=pv, token_type_ids=wrong)
    with pytest.raises(ImageTokenMismatchError, match="prompt_context"):
        model(torch.zeros(1, batch.seq_len, model.cfg.d_model), start_at_layer=1)
    with pytest.raises(ImageTokenMismatchError, match="features"):  # two views of pixels for one image's tokens
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=[pv[0], pv[0]],
              token_type_ids=(batch.tokens == model.image_encoder.image_token_id).long())
    plain = tiny_bpe_tokenizer(image_token="<image_soft_token>")
    with pytest.raises(ImageTokenMismatchError, match="start_of_image"):
        HookedMLLM.from_hf(tiny_gemma3(tiny_gemma3_tokenizer()), plain)
