"""Attention knockout and the alignment rules of interventions/core.py.

The pure functions (``mask_scores``, ``align_mask``, ``align_positions``, ``layer_window``) are checked on
hand-made tensors; the behaviour inside TransformerLens's attention (the NaN -> 0 rule for fully masked query
rows, renormalisation over the remaining keys) on the tiny circuit model's real ``hook_pattern``.
"""

from __future__ import annotations

import pytest
import torch

from modality_circuits.errors import InterventionError, SpanError
from modality_circuits.interventions import edge_mask, knockout, layer_window, mask_scores
from modality_circuits.interventions.core import (
    align_mask,
    align_positions,
    align_rows,
    check_heads,
    check_layers,
    first_query_seeing,
)
from modality_circuits.spans import Spans


def assert_no_hooks(model) -> None:
    for name, hp in model.hook_dict.items():
        assert not hp._forward_hooks and not hp._backward_hooks, f"hook left on {name}"
        assert not hp.fwd_hooks and not hp.bwd_hooks, f"hook handle left on {name}"


def causal_scores(b: int, h: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random attention scores with the causal mask already applied (as TL hands them to the hook)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, h, n, n, generator=g)
    return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))


def toy_spans(b: int = 2, n: int = 6) -> Spans:
    """Positions 0: bos, 1-2: image, 3-4: instruction, 5: last."""
    def m(idx):
        t = torch.zeros(b, n, dtype=torch.bool)
        t[:, idx] = True
        return t
    return Spans({"bos": m([0]), "image": m([1, 2]), "instruction": m([3, 4]), "last": m([5]),
                  "context": torch.zeros(b, n, dtype=torch.bool)})


# ------------------------------------------------------------------------------------------ mask_scores
def test_knockout_zeroes_masked_pairs_and_renormalises():
    spans = toy_spans()
    scores = causal_scores(2, 3, 6)
    m = edge_mask(spans, "image", ["instruction", "last"])
    assert m.shape == (2, 6, 6)
    assert m.sum() == 2 * 3 * 2  # 3 queries x 2 keys per prompt
    clean = scores.softmax(-1)
    ko = mask_scores(scores, m).softmax(-1)
    assert torch.all(ko[m[:, None].expand_as(ko)] == 0)
    torch.testing.assert_close(ko.sum(-1), torch.ones(2, 3, 6))
    # unmasked pairs keep their ratios: ko = clean / (mass left) on each row
    keep = ~m[:, None].expand_as(ko)
    left = (clean * keep).sum(-1, keepdim=True)
    torch.testing.assert_close(ko, torch.where(keep, clean / left, torch.zeros_like(clean)))
    # rows of queries outside dst are untouched
    assert torch.equal(ko[:, :, :3], clean[:, :, :3])


def test_first_query_seeing_the_source():
    """Where an edit of dst → src attention can first change anything: causal, except inside image blocks."""
    spans = toy_spans()  # 0 bos, 1-2 image, 3-4 instruction, 5 last
    assert first_query_seeing(spans, "image", ["instruction", "last"]) == 3
    assert first_query_seeing(spans, "bos", ["image", "last"]) == 1
    assert first_query_seeing(spans, "instruction", ["bos", "last"]) == 5  # bos comes before every source key
    assert first_query_seeing(spans, "instruction", "image") == 6  # nothing can change: the sequence length
    assert first_query_seeing(spans, "context", "last") == 6  # an empty source
    late, early = torch.zeros(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)
    late[:, 2], early[:, 1] = True, True
    assert first_query_seeing(spans, late, early) == 1  # an image block may look ahead: bounded by its first token
    assert first_query_seeing(spans, late, "bos") == 6
    # rows differ (padding): the earliest row decides
    rows = Spans({"image": torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool(),
                  "instruction": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]).bool()})
    assert first_query_seeing(rows, "image", "instruction") == 2


def test_knockout_of_an_empty_group_changes_nothing():
    spans = toy_spans()
    scores = causal_scores(2, 3, 6)
    m = edge_mask(spans, "context", "last", allow_empty=True)
    assert not m.any()
    assert torch.equal(mask_scores(scores, m), scores)
    with pytest.raises(SpanError, match="empty"):
        edge_mask(spans, "context", "last")  # empty groups are an error unless allowed


def test_mask_scores_only_touches_the_given_heads():
    spans = toy_spans()
    scores = causal_scores(2, 4, 6)
    out = mask_scores(scores, edge_mask(spans, "image", "last"), heads=[1, 3])
    assert torch.equal(out[:, [0, 2]], scores[:, [0, 2]])
    assert torch.isinf(out[:, [1, 3], 5, 1:3]).all()
    assert torch.equal(out[:, [1, 3], :5], scores[:, [1, 3], :5])


def test_fully_masked_row_in_plain_softmax_is_nan():
    """Why TL's rule matters: a plain softmax of an all -inf row is NaN (TL turns it into a zero row)."""
    scores = causal_scores(1, 1, 3)
    m = torch.zeros(1, 3, 3, dtype=torch.bool)
    m[0, 2, :] = True
    assert torch.isnan(mask_scores(scores, m).softmax(-1)[0, 0, 2]).all()


# ------------------------------------------------------------------------------------------- alignment
def test_align_rows_repeats_config_major_and_rejects_non_multiples():
    t = torch.arange(2)[:, None].expand(2, 3)
    r = align_rows(t, 6)
    assert r[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert align_rows(t, 2) is t
    with pytest.raises(InterventionError, match="built for 2 prompts met 5 rows"):
        align_rows(t, 5)


def test_align_mask_repeats_rows_and_shifts_queries_under_a_kv_cache():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 5, 5, generator=g) > 0.5
    # plain and repeated
    assert torch.equal(align_mask(mask, 2, 5, 5), mask)
    rep = align_mask(mask, 6, 5, 5)
    for k in range(3):
        assert torch.equal(rep[2 * k:2 * k + 2], mask)
    # suffix queries with a cached prefix: query i is absolute position k_len - q_len + i
    assert torch.equal(align_mask(mask, 2, 2, 5), mask[:, 3:, :])
    assert torch.equal(align_mask(mask, 4, 1, 5), mask[:, 4:, :].repeat(2, 1, 1))
    # continuation beyond the prompt (k_len > prompt length): those positions belong to no group
    out = align_mask(mask, 2, 3, 7)  # queries at absolute 4, 5, 6
    assert out.shape == (2, 3, 7)
    assert torch.equal(out[:, 0, :5], mask[:, 4, :])
    assert not out[:, 0, 5:].any() and not out[:, 1:].any()
    # per-head masks keep their head dimension
    mh = torch.rand(2, 3, 5, 5, generator=g) > 0.5
    outh = align_mask(mh, 4, 2, 5)
    assert outh.shape == (4, 3, 2, 5)
    assert torch.equal(outh[2:], mh[:, :, 3:, :])


def test_align_positions_offsets_and_pads():
    m = torch.tensor([[True, False, True, False], [False, True, True, True]])
    assert torch.equal(align_positions(m, 2, 4), m)
    assert torch.equal(align_positions(m, 2, 2, offset=2), m[:, 2:])
    out = align_positions(m, 4, 3, offset=3)  # absolute 3, 4, 5: only 3 is in the prompt
    assert out.shape == (4, 3)
    assert out[:, 0].tolist() == [False, True, False, True]
    assert not out[:, 1:].any()


# ------------------------------------------------------------------------------------------ layer ranges
@pytest.mark.parametrize("layer,k,mode,expected", [
    (3, 1, "centered", [3]), (3, 3, "centered", [2, 3, 4]), (3, 4, "centered", [2, 3, 4, 5]),
    (0, 3, "centered", [0, 1]), (5, 3, "centered", [4, 5]), (5, 5, "centered", [3, 4, 5]),
    (3, 3, "start", [3, 4, 5]), (5, 3, "start", [5]), (0, 9, "start", [0, 1, 2, 3, 4, 5]),
])
def test_layer_window(layer, k, mode, expected):
    assert layer_window(layer, k, 6, mode) == expected


def test_layer_window_bad_input():
    with pytest.raises(InterventionError, match=">= 1"):
        layer_window(2, 0, 6)
    with pytest.raises(InterventionError, match="'centered' or 'start'"):
        layer_window(2, 3, 6, "middle")


def test_check_layers_and_heads(circuit_model):
    assert check_layers(circuit_model, [-1, 0, 0]) == [0, 2]
    assert check_layers(circuit_model, 1) == [1]
    with pytest.raises(InterventionError, match="out of range: the model has 3 layers"):
        check_layers(circuit_model, [3])
    with pytest.raises(InterventionError, match="out of range"):
        check_layers(circuit_model, [-4])
    assert check_heads(circuit_model, None) is None
    with pytest.raises(InterventionError, match=r"Head index \[4\] out of range: layers have 4 heads"):
        check_heads(circuit_model, [0, 4])


# ---------------------------------------------------------------------------- inside TL's real attention
@pytest.fixture(scope="module")
def syn_batch(circuit_model, syn_samples):
    return circuit_model.prepare(syn_samples)


def patterns(model, batch, layers=None):
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    return logits, [cache[n] for n in names]


def test_knockout_in_tl_attention(circuit_model, syn_batch):
    model, b = circuit_model, syn_batch
    _, clean = patterns(model, b)
    with knockout(model, b.spans, "image", ["instruction", "last"], layers=[1]):
        logits, ko = patterns(model, b)
    assert_no_hooks(model)
    m = edge_mask(b.spans, "image", ["instruction", "last"])[:, None].expand_as(ko[1])
    assert torch.equal(ko[0], clean[0])  # layers before the knockout are untouched
    assert torch.all(ko[1][m] == 0)
    real = b.attention_mask.bool()[:, None, :, None].expand_as(ko[1])[..., 0]  # non-pad queries
    torch.testing.assert_close(ko[1].sum(-1)[real], torch.ones(int(real.sum())))
    left = (clean[1] * ~m).sum(-1, keepdim=True)
    expected = torch.where(m, torch.zeros_like(clean[1]), clean[1] / left.clamp_min(1e-30))
    q = real[..., None].expand_as(ko[1])
    torch.testing.assert_close(ko[1][q], expected[q], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ko[2], clean[2])  # later layers see the change
    assert torch.isfinite(logits).all()


def test_query_with_every_key_masked_gets_a_zero_row_and_finite_logits(circuit_model, syn_batch):
    """Documented behaviour: TL's NaN -> 0 rule gives an all-zero pattern row; no NaN reaches the logits."""
    from modality_circuits.metrics import following_scores

    model, b = circuit_model, syn_batch
    everything = b.attention_mask.bool()  # every real key, the query itself included
    layers = list(range(model.cfg.n_layers))
    names = [f"blocks.{i}.attn.hook_pattern" for i in layers] + [f"blocks.{i}.attn.hook_z" for i in layers]
    with knockout(model, b.spans, everything, "last", layers=layers), torch.no_grad():
        logits, cache = model.run_with_cache(b, names_filter=lambda n: n in names)
        scores = following_scores(model, b)
    for i in layers:
        p = cache[f"blocks.{i}.attn.hook_pattern"]
        assert not torch.isnan(p).any()
        assert torch.all(p[:, :, -1, :] == 0)
        assert torch.all(cache[f"blocks.{i}.attn.hook_z"][:, -1] == 0)  # the head writes only its bias there
        torch.testing.assert_close(p[:, :, -2, :].sum(-1), torch.ones(len(b), model.cfg.n_heads))
    assert torch.isfinite(logits).all()
    assert torch.isfinite(scores.logp_follow).all() and torch.isfinite(scores.logp_comp).all()
    assert_no_hooks(model)


# -------------------------------------------------------------------------------------------- bad input
def test_unknown_group_lists_available_groups(circuit_model, syn_batch):
    with pytest.raises(SpanError, match=r"no token group 'caption'\. Available groups: \[") as e:
        with knockout(circuit_model, syn_batch.spans, "caption", "last", layers=0):
            pass
    for g in syn_batch.spans.names:
        assert repr(g) in str(e.value)
    with pytest.raises(SpanError, match="Available groups"):
        with knockout(circuit_model, syn_batch.spans, "image", ["last", "answer"], layers=0):
            pass
    assert_no_hooks(circuit_model)


def test_knockout_layer_and_head_out_of_range(circuit_model, syn_batch):
    with pytest.raises(InterventionError, match="Layer 3 is out of range"):
        with knockout(circuit_model, syn_batch.spans, "image", "last", layers=[0, 3]):
            pass
    with pytest.raises(InterventionError, match="Head index"):
        with knockout(circuit_model, syn_batch.spans, "image", "last", layers=0, heads=[(0, 7)]):
            pass
    assert_no_hooks(circuit_model)


def test_no_hook_survives_an_exception_inside_knockout(circuit_model, syn_batch):
    with pytest.raises(RuntimeError, match="boom"):
        with knockout(circuit_model, syn_batch.spans, "image", "last", layers=[0, 1, 2]):
            assert circuit_model.hook_dict["blocks.1.attn.hook_attn_scores"]._forward_hooks
            raise RuntimeError("boom")
    assert_no_hooks(circuit_model)
