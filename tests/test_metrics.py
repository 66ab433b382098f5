"""Answer log-probabilities, the binary following score, relative change, summaries and closed-form MFR.

Full-answer scoring runs the prompt once with a KV cache and then only the answer continuations; it is
checked against a plain forward over the concatenated ``prompt + answer`` tokens, one answer at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modality_circuits.data.sample import Sample
from modality_circuits.errors import AnswerError
from modality_circuits.metrics import (
    FollowingScores,
    answer_logprobs,
    following_scores,
    mfr,
    relative_change,
    tokenize_answer,
)


@torch.no_grad()
def manual_logprob(model, batch, i: int, answer: str) -> float:
    """log P(answer | prompt i) from one unpadded forward over the prompt's tokens followed by the answer's."""
    sub = batch.select([i])
    n_pad = int((sub.attention_mask[0] == 0).sum())
    ids = torch.tensor(tokenize_answer(model.tokenizer, answer))
    prompt = sub.tokens[:, n_pad:]
    logits = model(torch.cat([prompt, ids[None]], dim=1), **sub.model_inputs)[0].double()
    L = prompt.shape[1]
    lp = logits[L - 1:L - 1 + len(ids)].log_softmax(-1)
    return float(lp.gather(1, ids[:, None]).sum())


@pytest.fixture(scope="module")
def multi_batch(circuit_model, multi_samples):
    return circuit_model.prepare(multi_samples)


def test_multi_token_answers_really_are_multi_token(circuit_model, multi_samples, multi_batch):
    lens = [len(tokenize_answer(circuit_model.tokenizer, a)) for s in multi_samples
            for a in (s.answer_img, s.answer_text)]
    assert max(lens) == 3 and min(lens) == 1
    assert len(set(multi_batch.attention_mask.sum(1).tolist())) > 1  # padded: prompt lengths differ


def test_full_answer_logprob_equals_concatenated_forward(circuit_model, multi_samples, multi_batch):
    answers = [[s.following_answer, s.competitor_answer] for s in multi_samples]
    lp = answer_logprobs(circuit_model, multi_batch, answers)
    assert lp.shape == (len(multi_samples), 2)
    for i, row in enumerate(answers):
        for k, a in enumerate(row):
            assert abs(float(lp[i, k]) - manual_logprob(circuit_model, multi_batch, i, a)) < 1e-5, (i, a)


def test_first_token_option(circuit_model, multi_samples, multi_batch):
    answers = [[s.following_answer, s.competitor_answer] for s in multi_samples]
    lp = answer_logprobs(circuit_model, multi_batch, answers, first_token=True)
    with torch.no_grad():
        last = circuit_model(multi_batch)[:, -1].double().log_softmax(-1)
    for i, row in enumerate(answers):
        for k, a in enumerate(row):
            t = tokenize_answer(circuit_model.tokenizer, a)[0]
            assert abs(float(lp[i, k]) - float(last[i, t])) < 1e-5
    full = answer_logprobs(circuit_model, multi_batch, answers)
    assert (full <= lp + 1e-6).all()  # more tokens can only lower the log-probability
    assert not torch.allclose(full, lp)


def test_single_token_answers_full_equals_first_token(circuit_model, syn_samples):
    b = circuit_model.prepare(syn_samples)
    full = following_scores(circuit_model, b)
    first = following_scores(circuit_model, b, first_token=True)
    torch.testing.assert_close(full.logp_follow, first.logp_follow)
    for i, s in enumerate(syn_samples):
        assert abs(float(full.logp_comp[i]) - manual_logprob(circuit_model, b, i, s.competitor_answer)) < 1e-5


def test_p_binary_is_sigmoid_of_logp_difference(circuit_model, multi_samples, multi_batch):
    s = following_scores(circuit_model, multi_batch)
    torch.testing.assert_close(s.p_binary, torch.sigmoid(s.logp_follow - s.logp_comp))
    pf, pc = s.logp_follow.double().exp(), s.logp_comp.double().exp()
    torch.testing.assert_close(s.p_binary.double(), pf / (pf + pc), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.leak, 1 - s.p_follow - s.p_comp)
    assert torch.equal(s.followed, s.logp_follow > s.logp_comp)
    for i, smp in enumerate(multi_samples):
        f = manual_logprob(circuit_model, multi_batch, i, smp.following_answer)
        c = manual_logprob(circuit_model, multi_batch, i, smp.competitor_answer)
        assert abs(float(s.p_binary[i]) - 1 / (1 + math.exp(c - f))) < 1e-5
    df = s.to_frame(multi_samples)
    assert list(df["sample_id"]) == [x.id for x in multi_samples]
    assert np.allclose(df["p_binary"], s.p_binary.numpy())


def test_following_scores_cat():
    a = FollowingScores(torch.tensor([-1.0]), torch.tensor([-2.0]))
    b = FollowingScores(torch.tensor([-3.0, -0.5]), torch.tensor([-1.0, -0.7]))
    c = FollowingScores.cat([a, b])
    assert c.logp_follow.tolist() == [-1.0, -3.0, -0.5]
    assert c.followed.tolist() == [True, False, True]


def test_relative_change():
    before = torch.tensor([0.5, 0.2, 0.8, 0.0])
    after = torch.tensor([0.25, 0.3, 0.8, 0.1])
    out = relative_change(before, after)
    torch.testing.assert_close(out[:3], torch.tensor([-0.5, 0.5, 0.0]))
    assert torch.isfinite(out).all()  # before = 0 is clamped, not a division by zero


def test_mfr_closed_form_is_share_of_samples_preferring_following(circuit_model, syn_samples, multi_samples):
    samples = list(syn_samples) + list(multi_samples)
    out = mfr(circuit_model, samples, batch_size=4, progress=False)
    share = np.mean([bool(following_scores(circuit_model, circuit_model.prepare([s])).followed[0])
                     for s in samples])
    assert out["n"] == len(samples)
    assert out["mfr"] == pytest.approx(share)
    assert out["competitor"] == pytest.approx(1 - share)
    assert out["other"] == 0.0
    assert 0 < share < 1  # the tiny model is not trivially one-sided here, so the check has teeth


# -------------------------------------------------------------------------------------------- bad input
def conflict(**kw) -> Sample:
    base = dict(image=None, context="The shape in the image is red .", instruction=None,
                question="What is the color of the shape?", constraint="The answer is", answer_img="blue",
                answer_text="red", follow="image", task="color", id="bad")
    base.update(kw)
    return Sample(**base)


def test_samples_without_two_distinct_answers(circuit_model):
    with pytest.raises(AnswerError, match="two distinct answers"):
        following_scores(circuit_model, circuit_model.prepare([conflict(answer_img="Red")]))
    with pytest.raises(AnswerError, match="answer_img is empty"):
        following_scores(circuit_model, circuit_model.prepare([conflict(answer_img="  ")]))
    with pytest.raises(AnswerError, match="carries no samples"):
        following_scores(circuit_model, circuit_model.prepare(["What is the color of the shape?"]))


def test_answers_that_tokenize_to_nothing_or_unknown_tokens(circuit_model):
    tok = circuit_model.tokenizer
    with pytest.raises(AnswerError, match="tokenizes to nothing"):
        tokenize_answer(tok, "")
    with pytest.raises(AnswerError, match="unknown to the tokenizer"):
        tokenize_answer(tok, "zebra")
    with pytest.raises(AnswerError, match="unknown to the tokenizer"):
        following_scores(circuit_model, circuit_model.prepare([conflict(answer_img="crimson")]))
    with pytest.raises(AnswerError, match=r"answers for 1 prompts, the batch has 2"):
        answer_logprobs(circuit_model, circuit_model.prepare([conflict(), conflict()]), [["red", "blue"]])
