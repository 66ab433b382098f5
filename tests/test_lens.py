"""Direct contributions at the last position and the logit lens at the instruction anchors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modality_circuits.data.sample import Sample
from modality_circuits.errors import AnswerError
from modality_circuits.lens import anchor_readout, contributions, last_position_contributions
from modality_circuits.metrics import following_scores, tokenize_answer


@pytest.mark.parametrize("which", ["syn", "multi"])
def test_contributions_sum_to_the_final_logit_difference(circuit_model, syn_samples, multi_samples, which):
    model = circuit_model
    samples = syn_samples if which == "syn" else multi_samples
    b = model.prepare(samples)
    contrib, labels, final = last_position_contributions(model, b)
    L = model.cfg.n_layers
    assert labels == ["embed"] + [f"{i}_{k}" for i in range(L) for k in ("attn_out", "mlp_out")]
    assert contrib.shape == (1 + 2 * L, len(samples))
    with torch.no_grad():
        logits = model(b)[:, -1]
    for i, s in enumerate(samples):  # the first-token logit difference, read off the logits by hand
        f = tokenize_answer(model.tokenizer, s.following_answer)[0]
        c = tokenize_answer(model.tokenizer, s.competitor_answer)[0]
        assert float(final[i]) == pytest.approx(float(logits[i, f] - logits[i, c]), abs=1e-5)
    torch.testing.assert_close(contrib.sum(0), final, atol=1e-4, rtol=0)

    df = contributions(model, samples, batch_size=3, progress=False)
    assert len(df) == len(samples) * (1 + 2 * L)
    assert set(df["kind"]) == {"embed", "attn", "mlp"}
    sums = df.groupby("sample_id")["contribution"].sum()
    finals = df.groupby("sample_id")["final_logit_diff"].first()
    assert np.abs(sums - finals).max() < 1e-4
    followed = following_scores(model, b).followed.tolist()
    assert df.groupby("sample_id", sort=False)["followed"].first().tolist() == followed


def test_lens_after_each_component(circuit_model, syn_samples):
    """The failure-stage read-out: after the last component it is the model's own logits; after a layer's
    attention / MLP it is the logit lens of resid_mid / resid_post there, computed by hand."""
    model = circuit_model
    b = model.prepare(syn_samples)
    _, labels, _, lens = last_position_contributions(model, b, with_lens=True)
    assert lens.shape == (len(labels), len(syn_samples), 2)
    f = torch.tensor([tokenize_answer(model.tokenizer, s.following_answer)[0] for s in syn_samples])
    c = torch.tensor([tokenize_answer(model.tokenizer, s.competitor_answer)[0] for s in syn_samples])
    rows = torch.arange(len(syn_samples))
    with torch.no_grad():
        logits, cache = model.run_with_cache(b)
    torch.testing.assert_close(lens[-1, :, 0], logits[rows, -1, f], atol=1e-4, rtol=0)
    torch.testing.assert_close(lens[-1, :, 1], logits[rows, -1, c], atol=1e-4, rtol=0)
    for layer, hook, k in ((0, "hook_resid_mid", labels.index("0_attn_out")),
                           (1, "hook_resid_post", labels.index("1_mlp_out"))):
        with torch.no_grad():
            by_hand = model.unembed(model.ln_final(cache[f"blocks.{layer}.{hook}"][:, -1:]))[:, 0]
        torch.testing.assert_close(lens[k, :, 0], by_hand[rows, f], atol=1e-4, rtol=0)
    df = contributions(model, syn_samples, batch_size=4, progress=False)
    assert {"lens_follow", "lens_comp"} <= set(df.columns)
    last = df[df["component"] == labels[-1]].set_index("sample_id").loc[[s.id for s in syn_samples]]
    np.testing.assert_allclose(last["lens_follow"] - last["lens_comp"], last["final_logit_diff"], atol=1e-4)


def test_anchor_readout(circuit_model, syn_samples):
    model = circuit_model
    df = anchor_readout(model, syn_samples, batch_size=4, progress=False)
    L = model.cfg.n_layers
    assert len(df) == 2 * 2 * L  # (condition) x (group) x (layer)
    assert set(df["group"]) == {"instruction", "last"} and set(df["condition"]) == {"image", "text"}
    for col in ("agreement", "follow_rate"):
        assert df[col].between(0, 1).all()
    b = model.prepare(syn_samples)
    for cond in ("image", "text"):
        idx = [i for i, s in enumerate(syn_samples) if s.follow == cond]
        for g in ("instruction", "last"):
            n = int(b.spans.mask(g)[idx].sum())
            assert (df[(df["condition"] == cond) & (df["group"] == g)]["n_tokens"] == n).all()
    # at the last position of the last layer the lens *is* the model: with one-token answers the decision
    # read there agrees with the final answer everywhere
    top = df[(df["group"] == "last") & (df["layer"] == L - 1)]
    assert (top["agreement"] == 1.0).all()
    assert df["agreement"].min() < 1.0  # earlier read-outs disagree somewhere on this random model


def test_ldar_is_the_share_of_samples_whose_mean_readout_matches_the_final_answer(circuit_model, syn_samples):
    """LDAR computed by hand from the cache: per sample, the sign of the mean lens logit difference over the
    instruction tokens at a layer, compared with the model's final decision."""
    model = circuit_model
    df = anchor_readout(model, syn_samples, batch_size=4, progress=False)
    b = model.prepare(syn_samples)
    final = following_scores(model, b).followed
    f = torch.tensor([tokenize_answer(model.tokenizer, s.following_answer)[0] for s in syn_samples])
    c = torch.tensor([tokenize_answer(model.tokenizer, s.competitor_answer)[0] for s in syn_samples])
    layer = 1
    _, cache = model.run_with_cache(b, names_filter=[f"blocks.{layer}.hook_resid_post"], return_type=None)
    logits = model.unembed(model.ln_final(cache[f"blocks.{layer}.hook_resid_post"]))  # [batch, pos, vocab]
    rows = torch.arange(len(syn_samples))
    diff = logits[rows, :, f] - logits[rows, :, c]  # [batch, pos]
    m = b.spans.mask("instruction")
    for cond in ("image", "text"):
        idx = [i for i, s in enumerate(syn_samples) if s.follow == cond]
        want = np.mean([bool((diff[i][m[i]].mean() > 0) == final[i]) for i in idx])
        r = df[(df["condition"] == cond) & (df["group"] == "instruction") & (df["layer"] == layer)].iloc[0]
        assert r["ldar"] == pytest.approx(want) and r["n_samples"] == len(idx)
        assert r["ldar_low"] <= r["ldar"] <= r["ldar_high"]
    last = df[df["group"] == "last"]  # one token per sample: LDAR is the token agreement
    assert np.allclose(last["ldar"], last["agreement"])


def test_lens_needs_answers_with_distinct_first_tokens(circuit_model):
    s = Sample(image=None, context="The shape in the image is dark red .", instruction=None,
               question="What is the color of the shape?", constraint="The answer is", answer_img="dark blue",
               answer_text="dark red", follow="image", task="color", id="same-first")
    with pytest.raises(AnswerError, match="share their first token"):
        last_position_contributions(circuit_model, circuit_model.prepare([s]))
