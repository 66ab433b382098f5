"""Activation and path patching: equality with TransformerLens on text-only prompts, image-aware pairs,
batched vs one-target-at-a-time runs, path patching against a hand-written computation, bad input."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from transformer_lens import patching as tlp

from modality_circuits import Segment
from modality_circuits.errors import InterventionError, SpanError
from modality_circuits.metrics import tokenize_answer
from modality_circuits.patching import (
    GroupResid,
    HeadInputs,
    PatchPair,
    ResidAt,
    activation_patch,
    image_swap,
    instruction_flip,
    patch_head_out,
    patch_image_embeds,
    patch_resid_pre,
    path_patch,
    path_patch_heads,
)

TOL = 1e-5


# ------------------------------------------------------------------------------------------------ fixtures
def _text_prompt(colour: str, question: str = "What is the color of the shape ?") -> list[Segment]:
    return [Segment("context", f"Text context: The shape in the image is {colour} ."), Segment("question", question)]


@pytest.fixture(scope="module")
def text_pair(circuit_model: Any) -> PatchPair:
    """Two text-only prompts per side, equal lengths, no padding (so TL's helpers on token ids apply)."""
    clean = circuit_model.prepare([_text_prompt("red"), _text_prompt("green")])
    corrupted = circuit_model.prepare([_text_prompt("blue"), _text_prompt("yellow")])
    assert bool(clean.attention_mask.all()) and clean.tokens.shape == corrupted.tokens.shape
    return PatchPair.from_batches(clean, corrupted, answers=[("red", "blue"), ("green", "yellow")])


@pytest.fixture(scope="module")
def tl_metric(circuit_model: Any, text_pair: PatchPair):
    tok = circuit_model.tokenizer
    a = torch.tensor([tok.convert_tokens_to_ids(x) for x, _ in text_pair.answers])
    b = torch.tensor([tok.convert_tokens_to_ids(y) for _, y in text_pair.answers])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last.gather(1, a[:, None]) - last.gather(1, b[:, None])).mean()

    return metric


@pytest.fixture(scope="module")
def flip_pair(circuit_model: Any, syn_samples: list) -> PatchPair:
    return instruction_flip(circuit_model, syn_samples[:3])


@pytest.fixture(scope="module")
def swap_pair(circuit_model: Any, syn_samples: list) -> PatchPair:
    """Same text, another image (donors: the next samples' images and image answers)."""
    samples = syn_samples[:2]
    donors = [replace(syn_samples[3], answer_img=a) for a in ("purple", "white")]
    for s, d in zip(samples, donors):
        assert s.answer_img != d.answer_img
    return image_swap(circuit_model, samples, donors)


def _first_ids(model: Any, pair: PatchPair) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor([tokenize_answer(model.tokenizer, x)[0] for x, _ in pair.answers])
    b = torch.tensor([tokenize_answer(model.tokenizer, y)[0] for _, y in pair.answers])
    return a, b


def _ld(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    last = logits[:, -1]
    return float((last.gather(1, a[:, None]) - last.gather(1, b[:, None])).mean())


# ------------------------------------------------------------------------------ TransformerLens equality
TL_CASES = [
    ("resid_pre", "pos", tlp.get_act_patch_resid_pre),
    ("resid_mid", "pos", tlp.get_act_patch_resid_mid),
    ("attn_out", "pos", tlp.get_act_patch_attn_out),
    ("mlp_out", "pos", tlp.get_act_patch_mlp_out),
    ("z", "pos", tlp.get_act_patch_attn_head_out_by_pos),
    ("k", "pos", tlp.get_act_patch_attn_head_k_by_pos),
    ("q", "head", tlp.get_act_patch_attn_head_q_all_pos),
    ("v", "head", tlp.get_act_patch_attn_head_v_all_pos),
    ("pattern", "pos", tlp.get_act_patch_attn_head_pattern_by_pos),
    ("pattern", "head", tlp.get_act_patch_attn_head_pattern_all_pos),
]


@pytest.mark.parametrize("component,by,tl_fn", TL_CASES, ids=[f"{c}-{b}" for c, b, _ in TL_CASES])
def test_equals_transformer_lens(circuit_model, text_pair, tl_metric, component, by, tl_fn):
    _, clean_cache = circuit_model.run_with_cache(text_pair.clean.tokens)
    ref = tl_fn(circuit_model, text_pair.corrupted.tokens, clean_cache, tl_metric)
    ours = activation_patch(circuit_model, text_pair, component, by=by, metric=tl_metric, normalize=False)
    assert ours.values.shape == ref.shape
    assert (ours.values - ref.cpu()).abs().max() < TOL
    # the named metric agrees with the callable one (single-token answers: first-token logit difference)
    if component == "resid_pre":
        named = activation_patch(circuit_model, text_pair, component, by=by, normalize=False)
        assert (named.values - ref.cpu()).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------ image pairs
def test_corrupted_run_uses_its_own_image(circuit_model, swap_pair):
    assert torch.equal(swap_pair.clean.tokens, swap_pair.corrupted.tokens)  # only the pixels differ
    pix_clean, pix_corr = swap_pair.clean.model_inputs["pixel_values"], swap_pair.corrupted.model_inputs["pixel_values"]
    assert not torch.equal(pix_clean, pix_corr)
    seen: list[torch.Tensor] = []

    def grab(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return logits[:, -1, 0].mean()

    # patching the BOS residual (identical in both runs) leaves the corrupted run as it is
    activation_patch(circuit_model, swap_pair, "resid_pre", by="pos", positions=[0], layers=[0], metric=grab)
    with torch.no_grad():
        plain_corr, plain_clean = circuit_model(swap_pair.corrupted), circuit_model(swap_pair.clean)
    m = swap_pair.clean.attention_mask.bool()
    assert (seen[-1][m] - plain_corr[m]).abs().max() < TOL
    assert (seen[-1][m] - plain_clean[m]).abs().max() > 1e-2

    # the image group at layer 0 (or the image features) carries the whole difference: full restore
    # (raw metrics are compared: the clean-corrupted gap of this random tiny model is small, ~4e-3)
    r = patch_resid_pre(circuit_model, swap_pair, by="group", groups=["image", "context"], layers=[0])
    assert abs(float(r.raw[0, 0]) - r.clean) < TOL and abs(float(r.raw[0, 1]) - r.corrupted) < TOL
    assert abs(r.clean - r.corrupted) > 1e-3 and abs(float(r.values[0, 0]) - 1) < 1e-3
    e = patch_image_embeds(circuit_model, swap_pair)
    assert e.values.shape == () and abs(float(e.raw) - e.clean) < TOL
    noised = patch_image_embeds(circuit_model, swap_pair, direction="noise")
    assert abs(float(noised.raw) - noised.corrupted) < TOL


def test_flip_pair_alignment(circuit_model, syn_samples, flip_pair):
    assert flip_pair.unaligned == ("instruction",)
    c, k = flip_pair.clean, flip_pair.corrupted
    for g in flip_pair.groups:
        assert torch.equal(c.spans.masks[g], k.spans.masks[g]), g
    # inserted pad slots change nothing: last-position logits equal those of the unaligned batches
    with torch.no_grad():
        for aligned, samples in ((c, syn_samples[:3]), (k, k.samples)):
            plain = circuit_model(circuit_model.prepare(samples))[:, -1]
            assert (circuit_model(aligned)[:, -1] - plain).abs().max() < TOL
    assert flip_pair.answers == [(s.following_answer, s.competitor_answer) for s in syn_samples[:3]]
    with pytest.raises(SpanError, match="'instruction' has 29 tokens in the clean prompt but 30"):
        patch_resid_pre(circuit_model, flip_pair, by="group", groups=["instruction"])
    with pytest.raises(SpanError, match="instruction"):
        PatchPair.from_batches(circuit_model.prepare(syn_samples[:3]), circuit_model.prepare(k.samples))


# ---------------------------------------------------------------------------- batched = one at a time
@pytest.mark.parametrize("component,by,kw", [
    ("resid_pre", "pos", dict(positions=[3, 20, 40, -7, -2, -1])),
    ("z", "group", dict(groups=["image", "context", "last"])),
    ("k", "pos", dict(positions=[12, -3, -1], layers=[1, 2])),
    ("pattern", "head", {}),
    ("mlp_out", "layer", {}),
])
def test_batched_equals_one_at_a_time(circuit_model, flip_pair, component, by, kw):
    batched = activation_patch(circuit_model, flip_pair, component, by=by, **kw)
    single = activation_patch(circuit_model, flip_pair, component, by=by, max_rows=len(flip_pair),
                              prefix_reuse=False, **kw)
    assert batched.values.shape == single.values.shape
    assert (batched.raw - single.raw).abs().max() < TOL
    assert torch.isfinite(batched.values).all()


def test_batched_multi_token_answers_and_noising(circuit_model, multi_samples, syn_samples):
    pair = instruction_flip(circuit_model, multi_samples[:3])  # 1-3 token answers: KV-cached continuations
    donors = [replace(syn_samples[3], answer_img=a) for a in ("purple", "white")]
    swap = image_swap(circuit_model, multi_samples[:2], donors)
    for direction in ("denoise", "noise"):
        kw = dict(positions=[5, -6, -1], metric="p_binary", direction=direction)
        batched = activation_patch(circuit_model, pair, "resid_pre", **kw)
        single = activation_patch(circuit_model, pair, "resid_pre", max_rows=len(pair), prefix_reuse=False, **kw)
        assert (batched.raw - single.raw).abs().max() < TOL
        # the embeddings at every prompt position carry everything: the answers' continuation follows exactly
        full = activation_patch(circuit_model, swap, "resid_pre", by="layer", layers=[0], metric="p_binary",
                                direction=direction)
        assert abs(float(full.values[0]) - (1.0 if direction == "denoise" else 0.0)) < 1e-4


def test_batched_matches_hand_loop_with_images(circuit_model, flip_pair):
    """Independent reference: one run_with_hooks per target on the corrupted batch (images re-encoded)."""
    res = activation_patch(circuit_model, flip_pair, "attn_out", by="group", groups=["image", "question", "last"],
                           first_token=True, normalize=False)
    a, b = _first_ids(circuit_model, flip_pair)
    _, cache = circuit_model.run_with_cache(flip_pair.clean)
    for li, layer in enumerate(res.labels["layer"]):
        for gi, g in enumerate(res.labels["group"]):
            m = flip_pair.group_mask(g)
            name = f"blocks.{layer}.hook_attn_out"

            def hook(act, hook, m=m, name=name):
                return torch.where(m[..., None], cache[name], act)

            with torch.no_grad():
                logits = circuit_model.run_with_hooks(flip_pair.corrupted, fwd_hooks=[(name, hook)])
            assert abs(_ld(logits, a, b) - float(res.raw[li, gi])) < TOL


# --------------------------------------------------------------------------------------- path patching
def _hand_path_patch(model, pair, sender_hook, freeze_heads, receivers, a, b):
    """The three runs written out: caches; clean run with the senders from the corrupted run (other heads
    frozen to clean if asked), receivers recorded; clean run with only the receivers replaced."""
    n = model.cfg.n_layers
    _, clean = model.run_with_cache(pair.clean)
    _, corr = model.run_with_cache(pair.corrupted)
    hooks = [sender_hook(clean, corr)]
    if freeze_heads is not None:
        for layer in range(n):
            name = f"blocks.{layer}.attn.hook_z"

            def freeze(z, hook, name=name, layer=layer):
                keep = torch.zeros_like(z, dtype=torch.bool)
                for lyr, h in freeze_heads:
                    if lyr == layer:
                        keep[:, :, h] = True
                return torch.where(keep, corr[name], clean[name])
            hooks.append((name, freeze))
    rec: dict[str, torch.Tensor] = {}
    for name, _ in receivers:
        hooks.append((name, lambda act, hook: rec.__setitem__(hook.name, act.clone())))
    with torch.no_grad():
        model.run_with_hooks(pair.clean, fwd_hooks=hooks)
        patch = [(name, lambda act, hook, sel=sel: torch.where(sel(act), rec[hook.name], act))
                 for name, sel in receivers]
        logits = model.run_with_hooks(pair.clean, fwd_hooks=patch)
    return _ld(logits, a, b)


def test_path_patch_heads_against_hand_computation(circuit_model, flip_pair):
    senders = [(0, 1), (1, 2)]
    last = flip_pair.clean.spans.mask("last")
    instr = flip_pair.clean.spans.mask("instruction")
    a, b = _first_ids(circuit_model, flip_pair)

    def q_sel(act):  # heads 0 and 3 of layer 2, last position
        s = torch.zeros_like(act, dtype=torch.bool)
        s[:, :, [0, 3]] = last[:, :, None, None]
        return s

    def v_sel(act):  # kv head 0 (query heads 0, 1) of layer 2, instruction positions
        s = torch.zeros_like(act, dtype=torch.bool)
        s[:, :, [0]] = instr[:, :, None, None]
        return s

    receivers = [("blocks.2.attn.hook_q", q_sel), ("blocks.2.attn.hook_v", v_sel)]
    ref = _hand_path_patch(circuit_model, flip_pair, lambda c, k: ("blocks.0.attn.hook_z", lambda z, hook: z),
                           senders, receivers, a, b)
    got = path_patch(circuit_model, flip_pair, senders,
                     [HeadInputs([(2, 0), (2, 3)], "q", "last"), HeadInputs([(2, 1)], "v", "instruction")],
                     first_token=True, normalize=False)
    assert abs(float(got.raw) - ref) < TOL
    assert got.component == "path[heads]"


def test_path_patch_group_resid_against_hand_computation(circuit_model, swap_pair):
    """image → instruction anchors (layer-2 residual) → output, nothing frozen."""
    img = swap_pair.group_mask("image")
    instr = swap_pair.clean.spans.mask("instruction")
    a, b = _first_ids(circuit_model, swap_pair)

    def sender(clean, corr):
        return ("blocks.0.hook_resid_pre", lambda x, hook: torch.where(img[..., None], corr[hook.name], x))

    ref = _hand_path_patch(circuit_model, swap_pair, sender, None,
                           [("blocks.2.hook_resid_pre", lambda act: instr[..., None].expand_as(act))], a, b)
    got = path_patch(circuit_model, swap_pair, GroupResid("image", layer=0), ResidAt("instruction", layer=2),
                     first_token=True, normalize=False)
    assert abs(float(got.raw) - ref) < TOL
    assert abs(float(got.raw) - got.clean) > 1e-4  # the image reaches the output through the instruction


def test_path_patch_through_everything_downstream_equals_activation_patching(circuit_model, flip_pair, swap_pair):
    act = patch_head_out(circuit_model, flip_pair, direction="noise", layers=[1])
    for h in range(circuit_model.cfg.n_heads):
        pp = path_patch(circuit_model, flip_pair, [(1, h)], ResidAt(None, layer=2))
        assert abs(float(pp.values) - float(act.values[0, h])) < TOL
    act_img = patch_resid_pre(circuit_model, swap_pair, by="group", groups=["image"], layers=[0], direction="noise")
    pp = path_patch(circuit_model, swap_pair, GroupResid("image", 0), ResidAt(None, layer=-1))
    assert abs(float(pp.raw) - float(act_img.raw[0, 0])) < TOL


def test_path_patch_heads_batched_equals_single(circuit_model, flip_pair):
    recv = HeadInputs([(2, 0), (2, 2)], ("q", "k"), "last")
    scan = path_patch_heads(circuit_model, flip_pair, recv, max_rows=64)
    assert scan.values.shape == (3, 4)
    assert torch.isnan(scan.values[2]).all()  # layer-2 heads do not reach layer-2 receivers
    for layer, h in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        one = path_patch(circuit_model, flip_pair, [(layer, h)], recv)
        assert abs(float(one.raw) - float(scan.raw[layer, h])) < TOL  # the metric itself
        # the normalised effect divides by (clean − noise), which magnifies fp32 noise; compare it relatively
        assert float(one.values) == pytest.approx(float(scan.values[layer, h]), rel=1e-4)


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input(circuit_model, flip_pair, text_pair, syn_samples):
    with pytest.raises(InterventionError, match=r"Valid components: \[.*'pattern'.*'resid_pre'"):
        activation_patch(circuit_model, text_pair, "resid_middle")
    with pytest.raises(InterventionError, match="by='head' is not available"):
        activation_patch(circuit_model, text_pair, "resid_pre", by="head")
    with pytest.raises(InterventionError, match="Unknown metric"):
        activation_patch(circuit_model, text_pair, "resid_pre", metric="accuracy")
    with pytest.raises(SpanError, match="Available groups"):
        activation_patch(circuit_model, text_pair, "resid_pre", by="group", groups=["imgae"])
    with pytest.raises(InterventionError, match="sender set is empty"):
        path_patch(circuit_model, flip_pair, [], ResidAt("last", 2))
    with pytest.raises(InterventionError, match="receiver set is empty"):
        path_patch(circuit_model, flip_pair, [(0, 1)], [])
    with pytest.raises(InterventionError, match="input must be"):
        path_patch(circuit_model, flip_pair, [(0, 1)], HeadInputs([(2, 0)], "o"))
    with pytest.raises(InterventionError, match="No receiver is downstream"):
        path_patch(circuit_model, flip_pair, [(2, 1)], HeadInputs([(1, 0)], "q"))
    with pytest.raises(InterventionError, match="out of range"):
        path_patch(circuit_model, flip_pair, [(7, 1)], ResidAt("last", -1))
    # misaligned pairs: different lengths, different segments, different batch sizes
    clean = circuit_model.prepare([_text_prompt("red")])
    longer = circuit_model.prepare([_text_prompt("red", "What is the color of the shape in the image ?")])
    with pytest.raises(SpanError, match="'question' has 8 tokens in the clean prompt but 11"):
        PatchPair.from_batches(clean, longer, answers=[("red", "blue")])
    no_ctx = circuit_model.prepare([[Segment("question", "What is the color ?"), Segment("context", "red .")]])
    with pytest.raises(SpanError, match="segment 3 is 'context' in the clean prompt but 'question'"):
        PatchPair.from_batches(clean, no_ctx, answers=[("red", "blue")], align=True)
    with pytest.raises(SpanError, match="1 prompts but the corrupted batch has 2"):
        PatchPair.from_batches(clean, text_pair.corrupted)
    with pytest.raises(SpanError, match="not one of the"):
        instruction_flip(circuit_model, [replace(syn_samples[0], instruction="Use the image.")])


# ------------------------------------------------------------------------------------------------ figures
def test_figures(circuit_model, flip_pair):
    from modality_circuits.viz.patching import patching_heatmap, top_heads, top_heads_attention

    by_pos = patch_resid_pre(circuit_model, flip_pair, positions=[0, 12, -2, -1])
    fig = patching_heatmap(by_pos)
    assert list(fig.data[0].x) == by_pos.labels["pos"] and fig.data[0].x[0] == "0 <s>"
    assert list(fig.data[0].y) == ["L0", "L1", "L2"] and by_pos.pos_groups == ["bos", "image.0", "template", "template"]
    heads3 = activation_patch(circuit_model, flip_pair, "z", by="group", groups=["image", "last"])
    assert heads3.axes == ("layer", "group", "head")
    fig3 = patching_heatmap(heads3)
    assert len(fig3.data) == circuit_model.cfg.n_heads and list(fig3.data[0].x) == ["image", "last"]
    heads = patch_head_out(circuit_model, flip_pair)
    top = top_heads(heads, k=3)
    eff = heads.values.abs()
    assert eff[top[0]] == eff.max() and len(set(top)) == 3
    props, view = top_heads_attention(circuit_model, flip_pair, heads, k=3, groups=("context", "last"))
    assert props["attentionHeadNames"] == [f"L{a}.H{b}" for a, b in top]
    n_ctx = int(flip_pair.clean.spans.mask("context")[0].sum())
    assert len(props["tokens"]) == n_ctx + 1 and "AttentionHeads" in view._repr_html_()
    df = heads.to_frame()
    assert len(df) == heads.values.numel() and {"layer", "head", "value", "raw"} <= set(df.columns)


def test_result_round_trips_through_its_table(circuit_model, text_pair):
    from modality_circuits.patching import PatchResult

    res = activation_patch(circuit_model, text_pair, "resid_pre", by="group", layers=[0, 2])
    back = PatchResult.from_frame(res.to_frame())
    assert back.axes == res.axes and back.labels == res.labels
    assert torch.allclose(back.values, res.values.float(), equal_nan=True)
    assert (back.component, back.metric, back.direction) == (res.component, res.metric, res.direction)
