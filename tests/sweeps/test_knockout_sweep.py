"""The knockout sweep: prefix-cached, batched configurations equal one full forward per configuration.

Both sample sets are padded batches with differing prompt lengths; the hand-made one has multi-token answers
of differing lengths, so full-answer scoring goes through the KV-cached continuation of the cached prefix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import naive_knockout_sweep

from modality_circuits.errors import InterventionError, SpanError
from modality_circuits.interventions import knockout
from modality_circuits.metrics import following_scores
from modality_circuits.stats import summarize
from modality_circuits.sweeps import DEFAULT_EDGES, knockout_sweep

COLUMNS = ["sample_id", "condition", "task", "kind", "edge", "src", "dst", "layer", "layers", "metric", "base",
           "value", "delta"]


def assert_no_hooks(model) -> None:
    for name, hp in model.hook_dict.items():
        assert not hp._forward_hooks, f"hook left on {name}"


def log_odds(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


VARIANT_COLUMNS = ["p_follow_base", "p_follow", "p_follow_delta", "p_outside_base", "p_outside"]


def compare(a, b, atol=1e-5):
    assert list(a.columns) == COLUMNS + VARIANT_COLUMNS
    assert len(a) == len(b) > 0
    key = ["sample_id", "edge", "layer"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert (a[key] == b[key]).all().all()
    for col in ("base", "value"):
        assert np.abs(a[col] - b[col]).max() < atol, col
        # also in log-odds, which does not hide differences between tiny probabilities
        assert np.abs(log_odds(a[col]) - log_odds(b[col])).max() < 1e-4, col
    # the comparison has teeth: every edge moves some sample's score
    assert (a.groupby("edge")["delta"].apply(lambda d: d.abs().max()) > 1e-3).all()
    # relative change of tiny probabilities amplifies float noise; compare it where p_base is not tiny
    big = a["base"] > 1e-3
    assert np.abs(a.loc[big, "delta"] - b.loc[big, "delta"]).max() < 1e-4


@pytest.mark.parametrize("window,mode", [(1, "centered"), (3, "centered"), (3, "start")])
@pytest.mark.parametrize("first_token", [False, True])
def test_cached_sweep_equals_naive_multi_token(circuit_model, multi_samples, window, mode, first_token):
    kw = dict(window=window, window_mode=mode, first_token=first_token, batch_size=4, progress=False)
    cached = knockout_sweep(circuit_model, multi_samples, **kw)
    naive = naive_knockout_sweep(circuit_model, multi_samples, **{k: v for k, v in kw.items() if k != "progress"})
    compare(cached, naive)
    assert len(cached) == len(multi_samples) * len(DEFAULT_EDGES) * circuit_model.cfg.n_layers
    assert_no_hooks(circuit_model)


@pytest.mark.parametrize("window,mode", [(1, "centered"), (3, "start")])
def test_cached_sweep_equals_naive_synthetic_two_batches(circuit_model, syn_samples, window, mode):
    """Six samples in batches of 4 and 2 (the last batch differs in size and padding)."""
    kw = dict(window=window, window_mode=mode, batch_size=4, progress=False)
    compare(knockout_sweep(circuit_model, syn_samples, **kw),
            naive_knockout_sweep(circuit_model, syn_samples, window=window, window_mode=mode, batch_size=4))


@pytest.mark.parametrize("first_token", [False, True])
def test_unconstrained_variant_equals_a_p_follow_sweep(circuit_model, multi_samples, first_token):
    """The variant columns come from the same forward and equal a separate sweep scored with P(following)."""
    kw = dict(edges=[("image", "last"), ("instruction", "last")], centers=[0, 2], first_token=first_token,
              batch_size=4, progress=False)
    both = knockout_sweep(circuit_model, multi_samples, **kw).sort_values(["sample_id", "edge", "layer"])
    alone = knockout_sweep(circuit_model, multi_samples, metric="p_follow", **kw).sort_values(
        ["sample_id", "edge", "layer"])
    assert list(alone.columns) == COLUMNS + VARIANT_COLUMNS and (alone["metric"] != both["metric"]).all()
    np.testing.assert_allclose(both["p_follow"].to_numpy(), alone["value"].to_numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(both["p_follow_base"].to_numpy(), alone["base"].to_numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(both["p_follow_delta"].to_numpy(), alone["delta"].to_numpy(), atol=1e-4)
    for col in ("p_outside", "p_outside_base"):
        assert both[col].between(-1e-6, 1).all()
    # P(f) + P(c) + P(outside) = 1, and the binary score is P(f) / (P(f) + P(c)) (checked where the two answers
    # hold enough mass for the subtraction to be well conditioned)
    ok = (1 - both["p_outside"]) > 1e-2
    p_c = 1 - both["p_follow"] - both["p_outside"]
    if ok.any():
        np.testing.assert_allclose(both["value"][ok], (both["p_follow"] / (both["p_follow"] + p_c))[ok], atol=1e-4)


def test_variant_only_for_named_answer_metrics():
    from modality_circuits.metrics import LogitsMetric, as_metric
    from modality_circuits.sweeps.knockout import _both_answers

    for name in ("p_binary", "p_follow", "logit_diff", "p_binary_first"):
        lp = _both_answers(as_metric(name))
        assert lp.kind == "logprobs" and lp.first_token == name.endswith("_first")
    assert _both_answers(LogitsMetric(lambda logits: logits[:, -1, 0])) is None


def test_sweep_rows_and_windows(circuit_model, syn_samples):
    df = knockout_sweep(circuit_model, syn_samples[:2], edges=[("image", "last")], centers=[0, 2], window=3,
                        progress=False)
    assert sorted(set(df["layers"])) == ["0,1", "1,2"]  # centered windows, clipped at the ends
    assert set(df["edge"]) == {"image↛last"}
    start = knockout_sweep(circuit_model, syn_samples[:2], edges=[("image", "last")], centers=[-1], window=3,
                           window_mode="start", progress=False)
    assert set(start["layers"]) == {"2"} and set(start["layer"]) == {2}
    s = summarize(df, "delta", ["edge", "layer"])
    assert len(s) == 2 and (s["ci_low"] <= s["mean"]).all()


def test_knockout_is_not_a_no_op(circuit_model, syn_samples):
    """image ↛ last over all layers moves the following score of some sample, and matches knockout()."""
    b = circuit_model.prepare(syn_samples)
    layers = list(range(circuit_model.cfg.n_layers))
    df = knockout_sweep(circuit_model, syn_samples, edges=[("image", "last")], centers=[1], window=3,
                        progress=False)
    assert df["delta"].abs().max() > 1e-2
    with knockout(circuit_model, b.spans, "image", "last", layers):
        direct = following_scores(circuit_model, b).p_binary
    base = following_scores(circuit_model, b).p_binary
    np.testing.assert_allclose(df.sort_values("sample_id")["value"].to_numpy(),
                               direct[np.argsort([s.id for s in syn_samples])].numpy(), atol=1e-5)
    np.testing.assert_allclose(df["base"].to_numpy(), base.numpy(), atol=1e-6)


def test_random_control_edge_equals_a_knockout_of_its_set(circuit_model, syn_samples):
    """``random0~instruction`` is a same-size random set per sample; its knockout equals knocking out that set."""
    from modality_circuits.spans import random_like

    edges = [("image", "instruction"), ("image", "random0~instruction")]
    df = knockout_sweep(circuit_model, syn_samples, edges=edges, centers=[1], batch_size=4, progress=False, seed=3)
    assert set(df["edge"]) == {"image↛instruction", "image↛random0~instruction"}
    b = circuit_model.prepare(syn_samples)
    ids = [s.id for s in syn_samples]
    spans = b.spans.with_group("r", random_like(b.spans, "instruction", ids, k=0, seed=3))
    with knockout(circuit_model, spans, "image", "r", [1]):
        direct = following_scores(circuit_model, b).p_binary
    got = df[df["edge"] == "image↛random0~instruction"].set_index("sample_id").loc[ids, "value"].to_numpy()
    np.testing.assert_allclose(got, direct.numpy(), atol=1e-5)


def test_sweep_bad_input(circuit_model, syn_samples):
    with pytest.raises(SpanError, match=r"Edge image↛caption: the prompts have no group 'caption'\. "
                                        r"Available groups: \["):
        knockout_sweep(circuit_model, syn_samples[:2], edges=[("image", "caption")], progress=False)
    with pytest.raises(InterventionError, match="out of range"):
        knockout_sweep(circuit_model, syn_samples[:2], centers=[5], progress=False)
    with pytest.raises(InterventionError, match="Unknown metric"):
        knockout_sweep(circuit_model, syn_samples[:2], edges=[("image", "last")], metric="accuracy", progress=False)
    with pytest.raises(InterventionError, match="Window size"):
        knockout_sweep(circuit_model, syn_samples[:2], window=0, progress=False)
    assert_no_hooks(circuit_model)


def test_empty_destination_everywhere_leaves_scores_unchanged(circuit_model, syn_samples):
    """A text-only sample set has no image tokens; an edge into a group empty in every prompt is a no-op."""
    from modality_circuits.data.synthetic import synthetic

    probes = synthetic(2, seed=1, kind="text_probe")  # no image, no instruction
    b = circuit_model.prepare(probes)
    assert "instruction" not in b.spans
    spans = b.spans.with_group("nothing", torch.zeros_like(b.spans.mask("last")))
    with knockout(circuit_model, spans, "context", "nothing", layers=[0, 1, 2], allow_empty=True):
        ko = following_scores(circuit_model, b).p_binary
    assert torch.equal(ko, following_scores(circuit_model, b).p_binary)
