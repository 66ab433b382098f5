"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL in HookedTransformer form: logits and generation equal HF (fp32, eager), M-RoPE is
real, attention edits are writable and agree with HF's 4-D attention-mask path, and bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment
from modality_circuits.errors import ImageTokenMismatchError
from modality_circuits.interventions import block_heads, edge_mask, knockout
from modality_circuits.models.qwen2_vl import mrope_positions
from modality_circuits.testing import random_images, tiny_qwen_tokenizer, tiny_qwen_vl

TOL = 1e-4


@pytest.fixture(scope="module")
def qtok():
    return tiny_qwen_tokenizer()


def _processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})


@pytest.fixture(scope="module", params=["2", "2.5", "3"])
def pair(request, qtok):
    hf = tiny_qwen_vl(qtok, version=request.param)
    return hf, HookedMLLM.from_hf(hf, qtok, _processor())


def _hf_logits(hf, batch, **kw):
    mi = batch.model_inputs
    extra = {}
    if "pixel_values" in mi:
        extra = dict(pixel_values=torch.cat(mi["pixel_values"]), image_grid_thw=mi["image_grid_thw"])
    mm = (batch.tokens == hf.config.image_token_id).int()
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=kw.pop("attention_mask", batch.attention_mask),
                  mm_token_type_ids=mm, **extra, **kw).logits


def _segs(images, texts):
    out = []
    for ims, text in zip(images, texts):
        out.append([*(Segment("image", image=im) for im in ims), Segment("context", f"Text context: {text}"),
                    Segment("question", "What is the color?")])
    return out


CASES = {
    "one_image": ([[0]], ["the shape is red."]),
    "two_images_different_grids": ([[0, 1]], ["red and blue."]),
    "batch_of_two_lengths": ([[0], [2]], ["the shape is red.", "blue"]),
    "text_only": ([[], []], ["the shape is red.", "blue"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_hf(pair, case):
    hf, model = pair
    ims = random_images(3, 32, seed=1)
    ims[1] = ims[1].resize((24, 32))  # a different grid
    idx, texts = CASES[case]
    batch = model.prepare(_segs([[ims[i] for i in row] for row in idx], texts))
    ours = model(batch)
    kw = {}
    if case == "text_only":  # HF infers unpadded positions for text-only inputs: give it the padded ones
        kw["position_ids"] = ((batch.attention_mask.cumsum(1) - 1).clamp(min=0))[None].expand(3, -1, -1)
    theirs = _hf_logits(hf, batch, **kw)
    m = batch.attention_mask.bool()
    assert (ours - theirs)[m].abs().max() < TOL
    if case == "two_images_different_grids":
        assert batch.model_inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 6]]


def test_mrope_is_used(pair):
    hf, model = pair
    batch = model.prepare(_segs([random_images(1, 32)], ["red"]))
    pos1 = ((batch.attention_mask.cumsum(1) - 1).clamp(min=0))[None].expand(3, -1, -1)
    out = model(batch)
    p = batch.rope_positions.clone()
    assert (out - model(batch, rope_positions=pos1)).abs().max() > 1e-2
    img = batch.spans.mask("image")[0]
    # inside the image the h/w components follow the 4x4 merged grid; t is constant
    assert p[0, 0, img].unique().numel() == 1
    assert p[1, 0, img].unique().numel() == 4 and p[2, 0, img].unique().numel() == 4


def test_generation_equals_hf(pair):
    hf, model = pair
    ims = random_images(2, 32, seed=2)
    batch = model.prepare(_segs([[ims[0]], [ims[1]]], ["the shape is red.", "blue"]))
    ours = model.generate(batch, max_new_tokens=5)
    mi = batch.model_inputs
    mm = (batch.tokens == hf.config.image_token_id).int()
    theirs = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask, mm_token_type_ids=mm,
                         pixel_values=torch.cat(mi["pixel_values"]), image_grid_thw=mi["image_grid_thw"],
                         max_new_tokens=5, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.tolist() == theirs[:, batch.tokens.shape[1]:].tolist()


def test_knockout_matches_hf_attention_mask_and_moves_output(pair):
    hf, model = pair
    batch = model.prepare(_segs([random_images(1, 32, seed=3), random_images(1, 32, seed=4)], ["red", "blue"]))
    clean = model(batch)
    with knockout(model, batch.spans, "image", "last", range(model.cfg.n_layers)):
        ko = model(batch)
    assert (ko[:, -1] - clean[:, -1]).abs().max() > 1e-3
    # the same edit through HF's 4-D additive attention mask (possible because it applies at every layer)
    L = batch.seq_len
    allowed = (torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & batch.attention_mask.bool()[:, None, :]
               & ~edge_mask(batch.spans, "image", "last"))
    mask4 = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    theirs = _hf_logits(hf, batch, attention_mask=mask4, position_ids=batch.rope_positions)
    assert (ko[:, -1] - theirs[:, -1]).abs().max() < TOL


def test_head_blocking_moves_output(pair):
    _, model = pair
    batch = model.prepare(_segs([random_images(1, 32, seed=5)], ["red"]))
    clean = model(batch)
    with block_heads(model, [(0, 0), (1, 1)]):
        blocked = model(batch)
    assert (blocked[:, -1] - clean[:, -1]).abs().max() > 1e-3
    assert not model.hook_dict["blocks.0.attn.hook_z"]._forward_hooks


def test_spans_hold_vision_markers_outside_image_group(pair):
    _, model = pair
    batch = model.prepare(_segs([random_images(1, 32)], ["red"]))
    toks = model.to_str_tokens(batch, 0)
    img = batch.spans.positions("image", 0)
    before, after = int(img.min()) - 1, int(img.max()) + 1
    off = int((~batch.attention_mask[0].bool()).sum())
    assert toks[before - off] == "<|vision_start|>" and toks[after - off] == "<|vision_end|>"
    assert batch.spans.counts()["image"] == [16]


def test_bad_input(pair):
    hf, model = pair
    batch = model.prepare(_segs([random_images(1, 32)], ["red"]))
    mi = batch.model_inputs
    with pytest.raises(ImageTokenMismatchError, match="image_grid_thw"):
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=mi["pixel_values"])
    with pytest.raises(ImageTokenMismatchError, match="image_grid_thw implies"):
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=mi["pixel_values"],
              image_grid_thw=torch.tensor([[1, 8, 6]]))
    with pytest.raises(ImageTokenMismatchError, match="mm_token_type_ids"):
        model(batch, mm_token_type_ids=torch.zeros_like(batch.tokens))
    with pytest.raises(ImageTokenMismatchError, match="image tokens but the images gave"):
        model(batch, image_features=torch.zeros(3, model.cfg.d_model))
    with pytest.raises(ImageTokenMismatchError, match="PIL"):
        model.prepare([[Segment("image", image=torch.zeros(3, 32, 32))]])
    with pytest.raises(ImageTokenMismatchError, match="videos are not converted"):
        model(batch.tokens, attention_mask=batch.attention_mask, pixel_values=mi["pixel_values"],
              image_grid_thw=mi["image_grid_thw"], video_grid_thw=torch.tensor([[2, 8, 8]]))


def test_mrope_positions_follow_hf_rule():
    # 2 text tokens, a 1x4x4 grid merged by 2 -> 2x2 image tokens, then 2 text tokens (left-padded by 1)
    tokens = torch.tensor([[0, 5, 5, 9, 9, 9, 9, 5, 5]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    p = mrope_positions(tokens, mask, 9, torch.tensor([[1, 4, 4]]), merge=2)
    assert p[:, 0, 1:3].tolist() == [[0, 1]] * 3
    assert p[0, 0, 3:7].tolist() == [2, 2, 2, 2]
    assert p[1, 0, 3:7].tolist() == [2, 2, 3, 3] and p[2, 0, 3:7].tolist() == [2, 3, 2, 3]
    assert p[:, 0, 7:].tolist() == [[4, 5]] * 3  # continues at start + max(h, w)/merge
    with pytest.raises(ImageTokenMismatchError):
        mrope_positions(tokens, mask, 9, None, merge=2)


def test_prefix_cached_sweep_equals_naive_under_mrope(pair):
    """The prefix-cached knockout sweep carries the M-RoPE positions of the clean run (no 1-D fallback)."""
    from reference import naive_knockout_sweep

    from modality_circuits.data import INSTRUCTIONS, Sample
    from modality_circuits.sweeps import knockout_sweep

    _, model = pair
    ims = random_images(2, 32, seed=7)
    samples = [Sample(image=ims[i], context="the shape is red.", instruction=INSTRUCTIONS[f], question="What is "
                      "the color of the shape?", constraint="Answer the question using a single word or phrase.",
                      answer_img="blue", answer_text="red circle", follow=f, id=str(i))
               for i, f in enumerate(["image", "text"])]
    edges = [("image", "last"), ("context", "instruction"), ("image", "context")]
    fast = knockout_sweep(model, samples, edges=edges, progress=False)
    slow = naive_knockout_sweep(model, samples, edges=edges)
    fast, slow = fast.sort_values(["sample_id", "edge", "layer"]), slow.sort_values(["sample_id", "edge", "layer"])
    assert (fast["value"].to_numpy() - slow["value"].to_numpy()).__abs__().max() < 1e-5
    assert (fast["delta"].abs() > 1e-4).any()


def test_no_forward_depends_on_an_earlier_one(pair):
    """The stale-state case: a start_at_layer run of prompt B right after a forward of an unrelated prompt A
    must give B's logits (rotary positions come from B's batch, not from what ran before)."""
    _, model = pair
    a = model.prepare(_segs([random_images(2, 32, seed=7)], ["red"]))
    b = model.prepare(_segs([random_images(1, 32, seed=8)], ["the shape is blue and small"]))
    want, cache = model.run_with_cache(b, names_filter="blocks.1.hook_resid_pre")
    model(a)
    got = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=b.attention_mask,
                **model.prompt_context(b))  # rotary positions (and Qwen3-VL's DeepStack features) of B
    assert torch.equal(got, want)
    with pytest.raises(ImageTokenMismatchError, match="rope_positions=batch.rope_positions"):
        model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=b.attention_mask)
