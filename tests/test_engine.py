"""The intervention core: every configuration stack scored by the prefix-cached engine equals the same
configuration applied around a plain forward; metrics are one protocol; bad arguments fail at the call."""

from __future__ import annotations

import pytest
import torch

from modality_circuits.engine import CleanRun, baseline, run
from modality_circuits.errors import InterventionError, SpanError
from modality_circuits.interventions import Knockout, ScaleAttention, ScaleHeads, Steer, apply, block_heads, mean_z
from modality_circuits.metrics import METRICS, AnswerMetric, LogitsMetric, as_metric, following_scores

ATOL = 1e-5


@pytest.fixture(scope="module")
def mbatch(circuit_model, multi_samples):
    return circuit_model.prepare(multi_samples)


@pytest.fixture(scope="module")
def clean(circuit_model, mbatch):
    return CleanRun.record(circuit_model, mbatch, keep_logits=True)


def configs(model, batch):
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=g)
    return [
        (),  # the unchanged run
        Knockout("image", "last", [1, 2]),
        Knockout(["context", "instruction"], "last", 0, heads=[(0, 1)]),
        ScaleHeads([(1, 2), (2, 0)], 0.0),
        ScaleHeads([(0, 3)], 4.0, positions="last"),
        ScaleHeads([(1, 1)], 0.0, positions="instruction", baseline=mean_z(model, batch)),
        ScaleAttention([(1, 0), (1, 3)], 3.0, src="image", dst="last"),
        Steer("last", v, layer=2, scale=2.0),
        Steer(None, v, layer=model.cfg.n_layers),  # the final residual, every position
        (Knockout("image", "instruction", [0]), Steer("context", v, layer=1)),  # applied together
    ]


def reference(model, batch, cfgs, metric):
    """One plain forward per configuration, under the public context manager."""
    out = []
    for c in cfgs:
        ivs = (c,) if not isinstance(c, tuple) else c
        with apply(model, batch, *ivs):
            out.append(as_metric(metric)(model, batch)[0])
    return torch.stack(out)


@pytest.mark.parametrize("metric", ["p_binary", "p_follow", "logit_diff", "p_binary_first"])
def test_engine_equals_applied_for_every_intervention(circuit_model, mbatch, clean, metric):
    cfgs = configs(circuit_model, mbatch)
    got = run(circuit_model, clean, cfgs, metric)
    want = reference(circuit_model, mbatch, cfgs, metric)
    assert got.shape == (len(cfgs), len(mbatch))
    assert float((got - want).abs().max()) < ATOL
    # the comparison has teeth: every intervention moves some sample
    assert ((got[1:] - got[0]).abs().amax(1) > 1e-4).all()
    # prefix=False (every row from layer 0) gives the same numbers
    assert float((run(circuit_model, clean, cfgs, metric, prefix=False) - got).abs().max()) < ATOL


def test_knockout_recomputes_from_the_first_query_that_sees_its_source(circuit_model, mbatch, clean):
    """Attention is causal: a destination wholly before its source changes nothing, and a destination spread over
    the prompt (a random stand-in) starts the recomputation at its first query after the source; the prefix-cached
    numbers still equal a forward from layer 0."""
    sp = mbatch.spans
    backward = Knockout("instruction", "context", [0, 1])  # every context token precedes the instruction
    spread = Knockout("context", ["system", "question"], [0, 1])  # the system prompt precedes the context
    scaled = ScaleAttention([(0, 1), (1, 2)], 4.0, src="context", dst=["system", "question"])
    assert backward.first_position(mbatch) == mbatch.seq_len
    assert spread.first_position(mbatch) == scaled.first_position(mbatch) == sp.first("question") > sp.first("system")
    cfgs = [(), backward, spread, scaled]
    got = run(circuit_model, clean, cfgs, "p_binary")
    assert torch.equal(got[1], got[0])
    assert (got[2:] - got[0]).abs().amax(1).min() > 1e-4
    assert float((run(circuit_model, clean, cfgs, "p_binary", prefix=False) - got).abs().max()) < ATOL


def test_callable_metric_sees_full_length_logits(circuit_model, mbatch, clean):
    seen = []

    def mean_logit_of_first_token(logits):
        seen.append(logits.shape[1])
        return logits[:, 3, 5]  # a position inside the cached prefix for the late knockout

    cfgs = [Knockout("image", "last", [2]), ScaleHeads([(0, 1)], 0.0)]
    got = run(circuit_model, clean, cfgs, mean_logit_of_first_token)
    want = reference(circuit_model, mbatch, cfgs, LogitsMetric(mean_logit_of_first_token))
    assert set(seen) == {mbatch.seq_len}
    assert float((got - want).abs().max()) < ATOL


def test_baseline_equals_following_scores(circuit_model, mbatch, clean):
    assert float((baseline(circuit_model, clean, "p_binary") - following_scores(circuit_model, mbatch).p_binary)
                 .abs().max()) < 1e-6
    s = following_scores(circuit_model, mbatch)
    assert float((baseline(circuit_model, clean, "p_follow") - s.p_follow).abs().max()) < 1e-6


def test_unconstrained_metric_is_not_the_binary_one(circuit_model, mbatch, clean):
    b, u = baseline(circuit_model, clean, "p_binary"), baseline(circuit_model, clean, "p_follow")
    assert (u <= b + 1e-6).all() and (b - u).abs().max() > 1e-3  # P(f) ≤ P(f)/(P(f)+P(c))


def test_steering_towards_the_answer_raises_its_logit_difference(circuit_model, mbatch, clean):
    samples = mbatch.samples
    f = [circuit_model.tokenizer(s.following_answer, add_special_tokens=False)["input_ids"][0] for s in samples]
    c = [circuit_model.tokenizer(s.competitor_answer, add_special_tokens=False)["input_ids"][0] for s in samples]
    direction = circuit_model.W_U[:, f].T - circuit_model.W_U[:, c].T  # [batch, d_model], one per sample
    L = circuit_model.cfg.n_layers
    vals = run(circuit_model, clean, [Steer("last", direction, L, scale=a) for a in (0.0, 0.5, 1.0)],
               "logit_diff_first")
    assert (vals[1] > vals[0]).all() and (vals[2] > vals[1]).all()
    assert torch.allclose(vals[0], baseline(circuit_model, clean, "logit_diff_first"), atol=1e-5)


def test_block_heads_with_a_group_name(circuit_model, mbatch):
    with pytest.raises(InterventionError, match="need the batch it belongs to"):
        with block_heads(circuit_model, [(1, 2)], positions="question"):
            pass
    with block_heads(circuit_model, [(1, 2)], positions="question", batch=mbatch):
        by_name = following_scores(circuit_model, mbatch).p_binary
    with block_heads(circuit_model, [(1, 2)], positions=mbatch.spans.mask("question")):
        by_mask = following_scores(circuit_model, mbatch).p_binary
    assert torch.allclose(by_name, by_mask, atol=1e-6)
    assert not torch.allclose(by_name, following_scores(circuit_model, mbatch).p_binary, atol=1e-4)


def test_wrong_types_fail_at_the_call(circuit_model, mbatch, clean):
    with pytest.raises(SpanError, match="token-group name"):
        Knockout(3, "last", [0])
    with pytest.raises(SpanError, match="token-group name"):
        ScaleHeads([(0, 1)], 0.0, positions=["question", 2])
    with pytest.raises(InterventionError, match=r"\(layer, head\) pairs"):
        ScaleHeads([1, 2], 0.0)
    with pytest.raises(InterventionError, match="α must be"):
        ScaleHeads([(0, 1)], -1.0)
    with pytest.raises(InterventionError, match="Unknown metric"):
        run(circuit_model, clean, [()], "accuracy")
    with pytest.raises(InterventionError, match="out of range"):
        run(circuit_model, clean, [Knockout("image", "last", [7])], "p_binary")
    with pytest.raises(SpanError, match="Available groups"):
        run(circuit_model, clean, [Knockout("caption", "last", [0])], "p_binary")
    with pytest.raises(InterventionError, match="d_model"):
        run(circuit_model, clean, [Steer("last", torch.zeros(3), 0)], "p_binary")


def test_named_metrics_are_answer_metrics():
    assert set(METRICS) >= {"p_binary", "p_follow", "logit_diff", "p_binary_first"}
    assert as_metric("p_binary", first_token=True) == AnswerMetric("p_binary", first_token=True)
    assert isinstance(as_metric(lambda logits: logits.sum()), LogitsMetric)


def test_knockout_heads_are_layer_head_pairs(circuit_model, mbatch, clean):
    one = run(circuit_model, clean, [Knockout("image", "last", [0, 1], heads=[(1, 2)])], "p_binary")
    with apply(circuit_model, mbatch, Knockout("image", "last", 1, heads=[(1, 2)])):
        want = following_scores(circuit_model, mbatch).p_binary
    assert torch.allclose(one[0], want, atol=ATOL)  # layer 0 has no listed head: untouched
    with pytest.raises(InterventionError, match="not in the knockout's layers"):
        run(circuit_model, clean, [Knockout("image", "last", [0], heads=[(1, 2)])], "p_binary")
    with pytest.raises(InterventionError, match=r"\(layer, head\) pairs"):
        Knockout("image", "last", [0], heads=[1])
