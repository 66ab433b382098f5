"""Head interventions and head scores, checked against hand computations on the tiny circuit model.

* zero/mean ablation = subtracting the head's ``z @ W_O`` (or its deviation from the mean) by hand;
* α = 1 is the identity, α = 2 adds the head's output once more;
* batched, prefix-cached head scans = one head at a time;
* attribution patching = the analytic gradient (autograd by hand, and a central finite difference along the
  ablation direction through the intervention itself);
* DLA per head sums to the lens's attention component; attention mass is a share;
* no hook survives an exception; selection and the critical-heads experiment produce sensible tables.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from reference import naive_ablation_scan

from modality_circuits.errors import InterventionError, SpanError
from modality_circuits.interventions import (
    amplify_attention,
    amplify_heads,
    block_heads,
    head_scale_hooks,
    knockout,
    mean_z,
)
from modality_circuits.lens import _answer_dirs, last_position_contributions
from modality_circuits.sweeps.head_experiment import heads_experiment
from modality_circuits.sweeps.heads import (
    ablation_scan_batch,
    attention_mass_batch,
    attribution_batch,
    dla_batch,
    head_scores,
    score_matrix,
    select_heads,
)

ATOL = 1e-5


def assert_no_hooks(model) -> None:
    for name, hp in model.hook_dict.items():
        assert not hp._forward_hooks and not hp._backward_hooks, f"hook left on {name}"
        assert not hp.fwd_hooks and not hp.bwd_hooks, f"hook handle left on {name}"


@pytest.fixture(scope="module")
def syn_batch(circuit_model, syn_samples):
    return circuit_model.prepare(syn_samples)


@pytest.fixture(scope="module")
def multi_batch(circuit_model, multi_samples):
    return circuit_model.prepare(multi_samples)


@pytest.fixture(scope="module")
def clean(circuit_model, syn_batch):
    with torch.no_grad():
        return circuit_model.run_with_cache(syn_batch)


def first_token_ld(model, batch, logits):
    f, c = _answer_dirs(model, batch.samples)
    last = logits[:, -1]
    return last.gather(1, f[:, None])[:, 0] - last.gather(1, c[:, None])[:, 0]


def head_out(model, z, layer, head):
    """A head's write into the residual stream: ``z[:, :, head] @ W_O[layer, head]``."""
    return torch.einsum("bpd,dm->bpm", z[:, :, head], model.W_O[layer, head])


# ------------------------------------------------------------------------------------- ablation by hand
@pytest.mark.parametrize("head", [0, 3])
def test_zero_ablation_of_a_final_layer_head_equals_removing_its_output(circuit_model, syn_batch, clean, head):
    model = circuit_model
    last = model.cfg.n_layers - 1
    logits, cache = clean
    # the final block by hand: resid_mid loses the head's output, then the block's MLP runs on what is left
    mid = cache[f"blocks.{last}.hook_resid_mid"] - head_out(model, cache[f"blocks.{last}.attn.hook_z"], last, head)
    block = model.blocks[last]
    with torch.no_grad():
        manual = model.unembed(model.ln_final(mid + block.mlp(block.ln2(mid))))
        with block_heads(model, [(last, head)]):
            hooked = model(syn_batch)
    torch.testing.assert_close(hooked, manual, atol=ATOL, rtol=0)
    assert (hooked - logits).abs().max() > 1e-3
    assert_no_hooks(model)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("positions", [None, "instruction"])
def test_ablation_changes_attn_out_by_the_heads_output(circuit_model, syn_batch, clean, layer, mode, positions):
    model = circuit_model
    _, cache = clean
    z = cache[f"blocks.{layer}.attn.hook_z"]
    pm = None if positions is None else syn_batch.spans.mask(positions)
    heads = [1, 2]
    base = mean_z(model, syn_batch) if mode == "mean" else None
    if mode == "mean":  # the baseline is the head's mean z over the batch's real tokens
        m = syn_batch.attention_mask.bool()
        torch.testing.assert_close(base[layer], z[m].mean(0))
    b = 0 if base is None else base[layer][None, None]
    change = sum(head_out(model, z - b, layer, h) for h in heads)
    if pm is not None:
        change = change * pm[..., None]
    expected = cache[f"blocks.{layer}.hook_attn_out"] - change
    got = {}

    def keep(x, hook):
        got["attn_out"] = x.detach().clone()

    with torch.no_grad(), block_heads(model, [(layer, h) for h in heads], mode=mode, reference=syn_batch,
                                      positions=pm):
        model.run_with_hooks(syn_batch, fwd_hooks=[(f"blocks.{layer}.hook_attn_out", keep)])
    torch.testing.assert_close(got["attn_out"], expected, atol=ATOL, rtol=0)
    assert_no_hooks(model)


def test_amplification_alpha_one_is_identity_and_alpha_two_doubles(circuit_model, syn_batch, clean):
    model = circuit_model
    logits, cache = clean
    heads = [(0, 0), (1, 3), (2, 1)]
    with torch.no_grad():
        with amplify_heads(model, heads, 1.0):
            same = model(syn_batch)
        assert torch.equal(same, logits)
        got = {}
        with amplify_heads(model, [(0, 2)], 2.0):
            model.run_with_hooks(syn_batch, fwd_hooks=[("blocks.0.hook_attn_out",
                                                        lambda x, hook: got.setdefault("a", x.clone()))])
    expected = cache["blocks.0.hook_attn_out"] + head_out(model, cache["blocks.0.attn.hook_z"], 0, 2)
    torch.testing.assert_close(got["a"], expected, atol=ATOL, rtol=0)
    assert_no_hooks(model)


def test_attention_amplification_scales_attention_ratios(circuit_model, syn_batch, clean):
    model = circuit_model
    _, cache = clean
    with torch.no_grad():
        with amplify_attention(model, syn_batch.spans, [(0, 1)], 1.0, src="image"):
            p1 = model.run_with_cache(syn_batch, names_filter="blocks.0.attn.hook_pattern")[1][
                "blocks.0.attn.hook_pattern"]
        with amplify_attention(model, syn_batch.spans, [(0, 1)], 3.0, src="image", dst="last"):
            p3 = model.run_with_cache(syn_batch, names_filter="blocks.0.attn.hook_pattern")[1][
                "blocks.0.attn.hook_pattern"]
    p0 = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(p1, p0)
    img = syn_batch.spans.mask("image")
    for i in range(len(syn_batch)):
        row0, row3 = p0[i, 1, -1], p3[i, 1, -1]
        ratio = (row3 / row0)
        torch.testing.assert_close(ratio[img[i]] / ratio[~img[i] & (row0 > 0)].mean(), torch.full(
            (int(img[i].sum()),), 3.0), rtol=1e-4, atol=0)
        torch.testing.assert_close(row3.sum(), torch.tensor(1.0))
    torch.testing.assert_close(p3[:, [0, 2, 3]], p0[:, [0, 2, 3]])  # other heads untouched
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------- batched head scans
def close(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("positions", [None, "last", "instruction"])
def test_cached_head_scan_equals_naive_full_answers(circuit_model, multi_batch, mode, positions):
    base = mean_z(circuit_model, multi_batch) if mode == "mean" else None
    cached = ablation_scan_batch(circuit_model, multi_batch, mode, positions)
    naive = naive_ablation_scan(circuit_model, multi_batch, positions, baseline=base)
    L, H, B = circuit_model.cfg.n_layers, circuit_model.cfg.n_heads, len(multi_batch)
    for k in ("delta", "d_logit"):
        assert cached[k].shape == (L, H, B)
        assert close(cached[k], naive[k]) < ATOL, k
    assert cached["d_logit"].abs().max() > 1e-2  # not a no-op
    assert_no_hooks(circuit_model)


@pytest.mark.parametrize("positions", [None, "last"])
def test_cached_head_scan_equals_naive_first_token(circuit_model, syn_batch, positions):
    cached = ablation_scan_batch(circuit_model, syn_batch, "zero", positions, first_token=True)
    naive = naive_ablation_scan(circuit_model, syn_batch, positions, first_token=True)
    for k in ("delta", "d_logit"):
        assert close(cached[k], naive[k]) < ATOL, k


def test_head_scan_matches_block_heads(circuit_model, multi_batch):
    """One entry of the scan, recomputed through the public context manager."""
    from modality_circuits.metrics import following_scores, relative_change

    scan = ablation_scan_batch(circuit_model, multi_batch, "zero", "last")
    base = following_scores(circuit_model, multi_batch).p_binary
    with block_heads(circuit_model, [(1, 2)], positions=multi_batch.spans.mask("last")):
        after = following_scores(circuit_model, multi_batch).p_binary
    torch.testing.assert_close(scan["delta"][1, 2], relative_change(base, after), atol=ATOL, rtol=1e-4)


def test_head_scan_bad_input(circuit_model, syn_batch):
    with pytest.raises(InterventionError, match="'zero' or 'mean'"):
        ablation_scan_batch(circuit_model, syn_batch, mode="resample")
    with pytest.raises(SpanError, match="Available groups"):
        ablation_scan_batch(circuit_model, syn_batch, positions="caption")
    with pytest.raises(InterventionError, match="Unknown head-score method"):
        head_scores(circuit_model, [], method="probing")


# --------------------------------------------------------------------------------------- attribution
def manual_attribution(model, batch, baseline=None, positions=None):
    """``Σ_pos ∂LD/∂z · (b − z)`` with torch.autograd.grad, independently of attribution_batch."""
    L = model.cfg.n_layers
    zs = {}

    def keep(z, hook):
        zs[hook.layer()] = z
        return z

    with torch.enable_grad(), model.hooks(fwd_hooks=[(f"blocks.{i}.attn.hook_z", keep) for i in range(L)]):
        ld = first_token_ld(model, batch, model(batch)).sum()
        grads = torch.autograd.grad(ld, [zs[i] for i in range(L)])
    pm = batch.attention_mask.bool() if positions is None else batch.spans.mask(positions)
    out = []
    for i in range(L):
        b = 0 if baseline is None else baseline[i]
        est = (grads[i] * (b - zs[i].detach())).sum(-1) * pm[..., None]
        out.append(est.sum(1).T)
    return torch.stack(out).detach()


@pytest.mark.parametrize("mode,positions", [("zero", None), ("mean", None), ("zero", "instruction")])
def test_attribution_equals_the_analytic_gradient(circuit_model, syn_batch, mode, positions):
    model = circuit_model
    base = mean_z(model, syn_batch) if mode == "mean" else None
    att = attribution_batch(model, syn_batch, mode, positions=positions)
    torch.testing.assert_close(att, manual_attribution(model, syn_batch, base, positions), atol=ATOL, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    assert_no_hooks(model)
    # a central finite difference along the ablation direction, through the intervention itself:
    # z(ε) = b + (1 − ε)(z − b), so dLD/dε at 0 = Σ ∂LD/∂z · (b − z)
    eps = 1e-2
    pm = None if positions is None else syn_batch.spans.mask(positions)
    for layer, head in [(0, 1), (1, 0), (2, 3)]:
        lds = []
        for a in (1 - eps, 1 + eps):
            with torch.no_grad(), model.hooks(fwd_hooks=head_scale_hooks(model, [(layer, head)], a, pm, base)):
                lds.append(first_token_ld(model, syn_batch, model(syn_batch)).double())
        fd = (lds[0] - lds[1]) / (2 * eps)
        torch.testing.assert_close(att[layer, head].double(), fd, atol=2e-3, rtol=2e-2)


def test_attribution_with_frozen_parameters_and_existing_grads(circuit_model, syn_batch):
    """Attribution needs gradients w.r.t. activations only: it works on a frozen model and leaves .grad alone."""
    model = circuit_model
    ref = attribution_batch(model, syn_batch)
    w = model.W_U
    sentinel = torch.full_like(w, 7.0)
    try:
        w.grad = sentinel.clone()
        torch.testing.assert_close(attribution_batch(model, syn_batch), ref)
        assert torch.equal(w.grad, sentinel)  # a user's accumulated gradient survives
        w.grad = None
        model.requires_grad_(False)
        torch.testing.assert_close(attribution_batch(model, syn_batch), ref)
    finally:
        model.requires_grad_(True)
        w.grad = None
    assert_no_hooks(model)


def test_attribution_tracks_exact_ablation(circuit_model, syn_batch):
    """On this model the first-order estimate agrees with the exact effect in sign for most (head, sample)."""
    att = attribution_batch(circuit_model, syn_batch)
    exact = ablation_scan_batch(circuit_model, syn_batch, "zero", None, first_token=True)["d_logit"]
    assert float((att.sign() == exact.sign()).float().mean()) > 0.7
    assert np.corrcoef(att.flatten().numpy(), exact.flatten().numpy())[0, 1] > 0.5


# ------------------------------------------------------------------------------------ DLA and attention
def test_dla_sums_to_the_lens_attention_components(circuit_model, syn_batch, clean):
    model = circuit_model
    dla = dla_batch(model, syn_batch)
    contrib, labels, final = last_position_contributions(model, syn_batch)
    _, cache = clean
    f, c = _answer_dirs(model, syn_batch.samples)
    d = (model.W_U[:, f] - model.W_U[:, c]).T * model.ln_final.w  # [batch, d_model]
    scale = cache["ln_final.hook_scale"][:, -1]
    for layer in range(model.cfg.n_layers):
        b_o = ((model.b_O[layer][None] / scale) * d).sum(-1)
        attn = contrib[labels.index(f"{layer}_attn_out")]
        torch.testing.assert_close(dla[layer].sum(0), attn - b_o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(contrib.sum(0), final, atol=1e-4, rtol=1e-4)
    # the final layer's DLA is exact to first order: it is the change of LD if the head's last-position
    # output is removed with the final norm's scale held fixed
    last = model.cfg.n_layers - 1
    z = cache[f"blocks.{last}.attn.hook_z"][:, -1, 2]
    torch.testing.assert_close(dla[last, 2], ((z @ model.W_O[last, 2]) / scale * d).sum(-1), atol=1e-5, rtol=1e-5)


def test_attention_mass_is_a_share(circuit_model, syn_batch, clean):
    model = circuit_model
    mass = attention_mass_batch(model, syn_batch)
    assert mass.shape == (model.cfg.n_layers, model.cfg.n_heads, len(syn_batch))
    assert (mass >= 0).all() and (mass <= 1 + 1e-6).all()
    # by hand for one head and sample: mean over last + instruction queries of the mass on the followed modality
    _, cache = clean
    i = 1
    keys = syn_batch.spans.mask("image" if syn_batch.samples[i].follow == "image" else "context")[i]
    q = syn_batch.spans.mask(["last", "instruction"])[i]
    p = cache["blocks.1.attn.hook_pattern"][i, 3]
    assert float(mass[1, 3, i]) == pytest.approx(float(p[q][:, keys].sum(-1).mean()), abs=1e-6)


# ------------------------------------------------------------------------------------ hooks and bad input
@pytest.mark.parametrize("which", ["block", "mean", "amplify", "attention", "knockout"])
def test_no_hook_survives_an_exception(circuit_model, syn_batch, which):
    model = circuit_model
    cms = {
        "block": lambda: block_heads(model, [(0, 1), (2, 0)]),
        "mean": lambda: block_heads(model, [(1, 1)], mode="mean", reference=syn_batch),
        "amplify": lambda: amplify_heads(model, [(0, 1)], 4.0),
        "attention": lambda: amplify_attention(model, syn_batch.spans, [(1, 0)], 2.0, src="image"),
        "knockout": lambda: knockout(model, syn_batch.spans, "image", "last", [0, 1]),
    }
    with pytest.raises(RuntimeError, match="inside"):
        with cms[which]():
            assert any(hp._forward_hooks for hp in model.hook_dict.values())
            with torch.no_grad():
                model(syn_batch)
            raise RuntimeError("inside")
    assert_no_hooks(model)


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf"), "2"])
def test_bad_alpha(circuit_model, syn_batch, alpha):
    with pytest.raises(InterventionError, match="finite number >= 0"):
        with amplify_heads(circuit_model, [(0, 0)], alpha):
            pass
    with pytest.raises(InterventionError, match="finite number >= 0"):
        with amplify_attention(circuit_model, syn_batch.spans, [(0, 0)], alpha, src="image"):
            pass
    assert_no_hooks(circuit_model)


def test_bad_head_specs(circuit_model, syn_batch):
    model = circuit_model
    with pytest.raises(InterventionError, match="needs α > 0"):
        with amplify_attention(model, syn_batch.spans, [(0, 0)], 0.0, src="image"):
            pass
    with pytest.raises(InterventionError, match=r"Head index \[4\] out of range"):
        with block_heads(model, [(0, 4)]):
            pass
    with pytest.raises(InterventionError, match="Layer 3 is out of range"):
        with amplify_heads(model, [(3, 0)], 2.0):
            pass
    with pytest.raises(InterventionError, match=r"\(layer, head\) pairs"):
        with block_heads(model, [(0, 1, 2)]):
            pass
    with pytest.raises(InterventionError, match="'zero' or 'mean'"):
        with block_heads(model, [(0, 1)], mode="resample"):
            pass
    with pytest.raises(InterventionError, match="needs a reference batch"):
        with block_heads(model, [(0, 1)], mode="mean"):
            pass
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("shape", [(3, 4), (6, 8), (32, 32)])
@pytest.mark.parametrize("pct", [0.1, 5.0, 10.0, 37.5, 100.0])
def test_select_heads_top_k(shape, pct):
    rng = np.random.default_rng(int(pct * 10) + shape[0])
    scores = rng.normal(size=shape)
    sel = select_heads(scores, pct)
    k = max(1, round(pct / 100 * scores.size))
    assert len(sel) == k == len(set(sel))
    vals = [scores[lh] for lh in sel]
    assert vals == sorted(vals, reverse=True)  # best first
    assert min(vals) >= np.sort(scores, axis=None)[::-1][k - 1]
    assert all(0 <= layer < shape[0] and 0 <= head < shape[1] for layer, head in sel)


def test_select_heads_ignores_nan_and_rejects_bad_pct():
    scores = np.array([[np.nan, 1.0], [3.0, 2.0]])
    assert select_heads(scores, 50) == [(1, 0), (1, 1)]
    for bad in (0, -5, 100.5, float("nan"), "5"):
        with pytest.raises(InterventionError, match=r"pct must be in \(0, 100\]"):
            select_heads(scores, bad)


def test_head_scores_tables(circuit_model, syn_samples):
    model = circuit_model
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for method in ("ablation", "attribution", "dla", "attention"):
        df = head_scores(model, syn_samples[:4], method=method, batch_size=3, progress=False)
        assert len(df) == 4 * L * H
        m = score_matrix(df)
        assert m.shape == (L, H) and np.isfinite(m).all()
        assert set(df["method"]) == {method}
    abl = head_scores(model, syn_samples[:4], method="ablation", positions="last", progress=False)
    b = model.prepare(syn_samples[:4])
    scan = ablation_scan_batch(model, b, "zero", "last")
    np.testing.assert_allclose(score_matrix(abl), -scan["delta"].mean(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(score_matrix(abl, value="d_logit"), scan["d_logit"].mean(-1).numpy(), atol=1e-6)
    assert score_matrix(abl, condition="image").shape == (L, H)


# ------------------------------------------------------------------------------------ critical heads
def test_heads_experiment_table(circuit_model):
    from modality_circuits.data.synthetic import synthetic

    conflict = synthetic(8, seed=2)
    general = synthetic(2, seed=3, kind="image_probe") + synthetic(2, seed=4, kind="text_probe")
    res = heads_experiment(circuit_model, conflict, general, pct=10, method="dla", alphas=(2.0, 4.0), n_random=2,
                           batch_size=8, progress=False)
    t = res.table
    assert len(res.selected) == max(1, round(0.1 * 12)) and len(res.random_sets) == 2
    assert not set(res.split["selection"]) & set(res.split["evaluation"])
    assert set(t["intervention"]) == {"none", "block", "amplify"}
    assert set(t["heads"]) == {"none", "selected", "random"}
    assert set(t["measure"]) >= {"mfr", "accuracy", "failed"}
    assert {"image_probe", "text_probe"} <= set(t["condition"])
    blocked = t[(t["measure"] == "mfr") & (t["intervention"] == "block")]
    assert (blocked.groupby("condition")["heads"].apply(lambda h: (h == "random").sum()) == 2).all()
    vals = t[t["measure"] != "failed"]["value"].dropna()
    assert ((vals >= 0) & (vals <= 1)).all()
    rated = t[(t["measure"] != "failed") & (t["n"] > 0)]  # every rate has its bootstrap interval around it
    assert ((rated["ci_low"] <= rated["value"]) & (rated["value"] <= rated["ci_high"])).all()
    assert t[t["measure"] == "failed"]["ci_low"].isna().all()
    s = res.summary()
    assert {"random_mean", "random_std"} <= set(s.columns)
    assert (s["heads"] != "random").all()
    assert_no_hooks(circuit_model)


def test_heads_experiment_without_failed_samples_warns_and_gives_nan(circuit_model, caplog):
    """If every evaluation sample already follows the instruction, restore rates are undefined (NaN, n=0)."""
    from modality_circuits.data.synthetic import synthetic
    from modality_circuits.metrics import score_dataset

    pool = synthetic(24, seed=5)
    ok = score_dataset(circuit_model, pool, progress=False).followed
    followed = [s for s, f in zip(pool, ok.tolist()) if f]
    assert len(followed) >= 4
    with caplog.at_level(logging.WARNING, logger="modality_circuits.sweeps.head_experiment"):
        res = heads_experiment(circuit_model, followed, pct=10, method="dla", alphas=(2.0,), n_random=1,
                               progress=False)
    assert "no failed samples" in caplog.text
    restored = res.table[res.table["measure"] == "restored"]
    assert len(restored) and restored["value"].isna().all() and (restored["n"] == 0).all()
    base = res.table[(res.table["measure"] == "mfr") & (res.table["intervention"] == "none")]
    assert (base["value"] == 1.0).all()


def test_heads_experiment_failed_pool(circuit_model):
    """Failures found in ``failed_pool`` are amplified alongside the evaluation split's; ids must not clash."""
    import dataclasses

    from modality_circuits.data.synthetic import synthetic
    from modality_circuits.metrics import score_dataset

    samples = synthetic(32, seed=5)
    ok = score_dataset(circuit_model, samples, progress=False).followed.tolist()
    followed = [s for s, f in zip(samples, ok) if f]
    failing = [dataclasses.replace(s, id=f"pool-{s.id}") for s, f in zip(samples, ok) if not f]
    assert len(followed) >= 4 and failing, "the fixture model should both follow and fail on some samples"
    res = heads_experiment(circuit_model, followed, pct=10, method="dla", alphas=(2.0,), n_random=1,
                           progress=False, failed_pool=failing)
    t = res.table
    for cond in ("image", "text"):
        n_fail = sum(s.follow == cond for s in failing)
        found = t[(t["condition"] == cond) & (t["measure"] == "failed")]
        if not len(found):
            continue  # no evaluation samples of this condition
        assert found["value"].iloc[0] == n_fail
        restored = t[(t["condition"] == cond) & (t["measure"] == "restored")]
        assert (restored["n"] == n_fail).all()
        assert restored["value"].notna().all() == (n_fail > 0)
    assert not set(res.split["selection"]) & {s.id for s in failing}
    with pytest.raises(InterventionError, match="disjoint"):
        heads_experiment(circuit_model, followed, method="dla", progress=False, failed_pool=followed[:1])


def test_heads_experiment_bad_input(circuit_model, syn_samples):
    for kw, msg in [(dict(alphas=(0.0,)), "must be > 0"), (dict(alphas=(math.nan,)), "must be > 0"),
                    (dict(n_random=0), "n_random"), (dict(select_frac=1.0), "select_frac"),
                    (dict(pct=0), "pct must be")]:
        with pytest.raises(InterventionError, match=msg):
            heads_experiment(circuit_model, syn_samples, method="dla", progress=False, **kw)


# ------------------------------------------------------------------------------------------- M-RoPE
@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("positions", [None, "last"])
def test_cached_head_scan_equals_naive_under_mrope(version, positions):
    """Qwen2-VL's 3-D rotary positions survive the layer-prefix cache (base scores included)."""
    from transformers import Qwen2VLImageProcessorPil

    from modality_circuits import HookedMLLM
    from modality_circuits.data import INSTRUCTIONS, Sample
    from modality_circuits.testing import random_images, tiny_qwen_tokenizer, tiny_qwen_vl

    tok = tiny_qwen_tokenizer()
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    model = HookedMLLM.from_hf(tiny_qwen_vl(tok, version=version), tok, proc)
    ims = random_images(2, 32, seed=7)
    samples = [Sample(image=ims[i], context="the shape is red." if i else "blue", instruction=INSTRUCTIONS[f],
                      question="What is the color of the shape?", constraint="The answer is", answer_img="blue",
                      answer_text="red circle", follow=f, id=str(i)) for i, f in enumerate(["image", "text"])]
    b = model.prepare(samples)
    cached = ablation_scan_batch(model, b, "zero", positions)
    naive = naive_ablation_scan(model, b, positions)
    for k in ("delta", "d_logit"):
        assert close(cached[k], naive[k]) < ATOL, k
    assert cached["d_logit"].abs().max() > 1e-3
