"""The engine's shared-prefix KV caches: attention over a prefix held once equals TransformerLens's attention over
per-row copies (grouped-query heads, M-RoPE, DeepStack, bidirectional image blocks, sliding windows, q/k norm), and
every engine score equals the same intervention around a plain forward (TransformerLens's own attention path)."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment, metrics
from modality_circuits.engine import CleanRun, run
from modality_circuits.errors import UnsupportedArchitectureError
from modality_circuits.interventions import Knockout, ScaleHeads, apply
from modality_circuits.metrics import as_metric
from modality_circuits.models.shared_kv import SharedPrefixKV, shared_kv_unsupported
from modality_circuits.testing import (
    random_images,
    tiny_bpe_tokenizer,
    tiny_gemma3,
    tiny_gemma3_tokenizer,
    tiny_llava,
    tiny_qwen_tokenizer,
    tiny_qwen_vl,
)

ATOL = 2e-5


@pytest.mark.parametrize("qn, dense", [(2, False), (8, True)])  # short query runs split scores, long ones don't
def test_scores_and_mix_equal_repeated_prefix_with_grouped_heads(qn, dense):
    g = torch.Generator().manual_seed(0)
    B, m, p, s, kv, grp, d = 2, 3, 5, 4, 2, 3, 8
    R, H = m * B, kv * grp
    e = SharedPrefixKV(torch.randn(B, p, kv, d, generator=g), torch.randn(B, p, kv, d, generator=g), R)
    e.append(torch.randn(R, s, kv, d, generator=g), torch.randn(R, s, kv, d, generator=g))
    q = torch.randn(R, qn, H, d, generator=g)
    assert e._dense(qn, H) == dense
    k, v = e.full()  # [R, p + s, kv, d]: prefix row r % B, config-major as Tensor.repeat
    assert torch.equal(k[B + 1, :p], e.prefix_k[1]) and k.shape == (R, p + s, kv, d)
    k_h, v_h = k.repeat_interleave(grp, 2), v.repeat_interleave(grp, 2)  # TransformerLens's grouped-query layout
    want = torch.einsum("rqhd,rkhd->rhqk", q, k_h)
    assert torch.allclose(e.scores(q), want, atol=1e-5)
    pattern = want.softmax(-1)
    assert torch.allclose(e.mix(pattern), torch.einsum("rhqk,rkhd->rqhd", pattern, v_h), atol=1e-5)
    two = e.repeat_rows(2)  # answer continuations: every row twice, prefix still shared
    assert two.rows == 2 * R and two.prefix_k is e.prefix_k and torch.equal(two.full()[0], k.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="whole number of copies"):
        SharedPrefixKV(e.prefix_k, e.prefix_v, R + 1)


def _llava():
    tok = tiny_bpe_tokenizer()
    hf = tiny_llava(tok, decoder="qwen2", n_layers=3, n_heads=4, n_kv_heads=2, seed=3, text_overrides={
        "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1})
    return HookedMLLM.from_hf(hf, tok)


def _gemma3():
    tok = tiny_gemma3_tokenizer()
    return HookedMLLM.from_hf(tiny_gemma3(tok, seed=2), tok)


def _qwen(version):
    from transformers import Qwen2VLImageProcessorPil

    tok = tiny_qwen_tokenizer()
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    return HookedMLLM.from_hf(tiny_qwen_vl(tok, version=version), tok, proc)


BUILDERS = {"llava-gqa-sliding": _llava, "gemma3": _gemma3, "qwen2-vl": lambda: _qwen("2"),
            "qwen3-vl": lambda: _qwen("3")}


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def _batch(model):
    ims = random_images(2, 32, seed=1)
    return model.prepare([
        [Segment("image", image=ims[0]), Segment("context", "The shape is red."),
         Segment("question", "What is the color?")],
        [Segment("context", "The shape is blue and it is on the left side."), Segment("image", image=ims[1]),
         Segment("question", "the shape?")]])


def _reference(model, batch, configs, metric):
    out = []
    for c in configs:
        with apply(model, batch, *((c,) if not isinstance(c, tuple) else c)):
            out.append(metric(model, batch)[0])
    return torch.stack(out)


def test_engine_equals_plain_forwards(model, monkeypatch):
    assert shared_kv_unsupported(model) is None
    calls, shared_below = [], []
    scores = SharedPrefixKV.scores
    monkeypatch.setattr(SharedPrefixKV, "scores", lambda self, q: calls.append(q.shape) or scores(self, q))
    below = metrics._clean_continuation
    monkeypatch.setattr(metrics, "_clean_continuation", lambda *a: shared_below.append(a[5]) or below(*a))
    batch = _batch(model)
    clean = CleanRun.record(model, batch)
    assert clean.shared and clean.rotated
    L = model.cfg.n_layers
    image = next(n for n in batch.spans.names if n.startswith("image"))
    configs = [(), Knockout("context", "last", [L - 1]), Knockout(image, "question", [1]),
               Knockout("context", "question", [0, 1]), ScaleHeads([(1, 0)], 0.0, positions="last"),
               (Knockout(image, "last", [0]), ScaleHeads([(L - 1, 1)], 3.0))]
    # multi-token answers: the continuation reads the shared prefix through repeat_rows
    for metric in (as_metric("logit_diff", answers=[("blue square", "red circle")] * 2),
                   as_metric("p_binary_first", answers=[("blue", "red")] * 2)):
        got = run(model, clean, configs, metric)
        want = _reference(model, batch, configs, metric)
        assert float((got - want).abs().max()) < ATOL
        assert (got[1:] - got[0]).abs().amax(1).gt(1e-5).any()  # the comparison has teeth
        single = torch.stack([run(model, clean, [c], metric)[0] for c in configs])  # other groupings, other m
        assert float((single - got).abs().max()) < ATOL
        late = run(model, clean, [configs[i] for i in (1, 2, 4)], metric)  # from layer 1: continuations share
        assert float((late - want[[1, 2, 4]]).abs().max()) < ATOL  # layer 0 over the copies
    assert {shape[1] for shape in calls} >= {1}  # single positions (last, continuations) read the shared prefix
    assert len({shape[0] for shape in calls}) > 2  # with several row counts (copies × prompts × answers)
    assert shared_below == [1]  # only the multi-token metric's late run continues from a layer


def test_a_hook_on_rotated_keys_sees_every_key_and_changes_nothing(model):
    batch = _batch(model)
    clean = CleanRun.record(model, batch)
    metric = as_metric("logit_diff", answers=[("blue square", "red circle")] * 2)
    configs = [Knockout("context", "last", [1]), Knockout("context", "question", [1])]
    plain = run(model, clean, configs, metric)
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_rot_k", lambda k, hook: seen.append(k.shape[1]))]):
        hooked = run(model, clean, configs, metric)
    assert float((hooked - plain).abs().max()) < ATOL
    assert batch.seq_len in seen  # the full key length, prefix included


def test_a_config_change_after_recording_is_refused(model):
    batch = _batch(model)
    clean = CleanRun.record(model, batch)
    model.set_use_attn_result(True)
    try:
        assert "use_attn_result" in shared_kv_unsupported(model)
        with pytest.raises(UnsupportedArchitectureError, match="record the clean run again"):
            run(model, clean, [Knockout("context", "last", [1])], as_metric("logit_diff", answers=[("a", "b")] * 2))
        fresh = CleanRun.record(model, batch)  # recorded now: TransformerLens's caches, same numbers
        assert not fresh.shared
        metric = as_metric("logit_diff", answers=[("blue square", "red circle")] * 2)
        old = run(model, fresh, [Knockout("context", "last", [1])], metric)
    finally:
        model.set_use_attn_result(False)
    new = run(model, CleanRun.record(model, batch), [Knockout("context", "last", [1])], metric)
    assert float((old - new).abs().max()) < ATOL


def test_answer_scores_and_generation_read_the_prompt_through_a_shared_cache(model, monkeypatch):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from modality_circuits.metrics import answer_logprobs

    batch = _batch(model)
    answers = [["blue square", "red circle"], ["left side of it", "red"]]

    def tl_pass():
        c = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(batch))
        return model(batch, past_kv_cache=c), c

    calls = []
    scores = SharedPrefixKV.scores
    monkeypatch.setattr(SharedPrefixKV, "scores", lambda self, q: calls.append(q.shape) or scores(self, q))
    with torch.no_grad():
        shared = answer_logprobs(model, batch, answers)
        n_answer_calls = len(calls)
        plain = answer_logprobs(model, batch, answers, prompt_pass=tl_pass)  # TransformerLens's cache
        assert n_answer_calls > 0 and len(calls) == n_answer_calls  # only the default path read a shared cache
        assert float((shared - plain).abs().max()) < ATOL
        fast = model.generate(batch, max_new_tokens=4)
        slow = model.generate(batch, max_new_tokens=4, use_past_kv_cache=False)  # every step from the tokens
    assert len(calls) > n_answer_calls and torch.equal(fast, slow)
