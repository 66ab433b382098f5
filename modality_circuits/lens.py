"""Direct contributions at the last position and the logit lens at the instruction anchors.

**Contributions** ("MLP semantic inertia" view). The final residual at the last position is the sum of the
embedding and every layer's attention and MLP output, ``x = e + Σ_l (a_l + m_l)``. With the final norm's scale
``s`` frozen at its value on ``x``, the logit difference between the following and the competitor answer's
first tokens, ``Δ = RMSNorm(x) · (W_U[:, f] − W_U[:, c])``, splits exactly into per-component terms
``c_i = (x_i / s) · (w ⊙ (W_U[:, f] − W_U[:, c]))`` (``w``: the norm weight; ``b_U`` cancels in the difference),
so ``Σ_i c_i = Δ`` (tested to 1e-4).

**Anchor read-out.** At each layer, the residual stream at the instruction positions (and, for comparison,
the last position) is decoded with the final norm and unembedding (logit lens); the decision read there is
``following`` if the following answer's first token out-scores the competitor's. The table reports, per layer,
how often that decision agrees with the model's final (closed-form) answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ._types import Float
from .errors import AnswerError
from .metrics import following_scores, iter_batches, tokenize_answer
from .prompts import MLLMBatch

if TYPE_CHECKING:
    from .models.hooked_mllm import HookedMLLM


def _answer_dirs(model: HookedMLLM, samples: Sequence[Any]) -> tuple[Tensor, Tensor]:
    f = [tokenize_answer(model.tokenizer, s.following_answer)[0] for s in samples]
    c = [tokenize_answer(model.tokenizer, s.competitor_answer)[0] for s in samples]
    if any(a == b for a, b in zip(f, c)):
        raise AnswerError("The following and competitor answers share their first token in some sample; the "
                          "first-token logit difference is 0 there. Use answers that differ in their first token.")
    dev = model.cfg.device
    return torch.tensor(f, device=dev), torch.tensor(c, device=dev)


def _final_norm_weight(model: HookedMLLM) -> Tensor:
    w = getattr(model.ln_final, "w", None)
    return w if w is not None else torch.ones(model.cfg.d_model, device=model.cfg.device)


def answer_direction(model: HookedMLLM, samples: Sequence[Any]) -> Float[Tensor, "batch d_model"]:
    """``w ⊙ (W_U[:, f] − W_U[:, c])`` per sample: the residual direction of the first-token logit difference
    under the final norm's weight ``w`` (the scale is applied separately, :func:`direct_effect`)."""
    f, c = _answer_dirs(model, samples)
    return (model.W_U[:, f] - model.W_U[:, c]).T * _final_norm_weight(model)


def direct_effect(parts: Float[Tensor, "... batch d_model"], direction: Float[Tensor, "batch d_model"],
                  scale: Float[Tensor, "batch 1"]) -> Float[Tensor, "... batch"]:
    """Direct logit attribution: each part's contribution ``(x_i / s) · d`` to the first-token logit difference
    with the final norm's scale ``s`` frozen (the one DLA formula; contributions and head scores use it)."""
    return ((parts / scale) * direction).sum(-1)


def _lens_after_components(model: HookedMLLM, cache: Any, f: Tensor, c: Tensor
                           ) -> Float[Tensor, "component batch 2"]:
    """Logit lens at the last position after each component (``embed, 0_attn_out, 0_mlp_out, …``): the first-token
    logits of the following and competitor answers read from the running residual with the final norm."""
    acc = cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=-1)  # [0_pre, 0_mid, 1_pre, …, final_post]
    x = model.ln_final(acc)  # [component, batch, d_model]: a fresh norm scale per read-out (the logit lens)
    lf = torch.einsum("kbd,db->kb", x, model.W_U[:, f]) + model.b_U[f]  # [component, batch]
    lc = torch.einsum("kbd,db->kb", x, model.W_U[:, c]) + model.b_U[c]
    return torch.stack([lf, lc], -1)


@torch.no_grad()
def last_position_contributions(model: HookedMLLM, batch: MLLMBatch, with_lens: bool = False
                                ) -> tuple[Float[Tensor, "component batch"], list[str], Tensor] | tuple[
                                    Float[Tensor, "component batch"], list[str], Tensor, Tensor]:
    """Per-component direct contributions to the first-token logit difference at the last position.

    Returns ``(contributions [component, batch], labels, final logit difference [batch])`` with labels
    ``embed, 0_attn_out, 0_mlp_out, …``; ``with_lens`` adds ``[component, batch, 2]``: the logit lens (following,
    competitor first-token logits) at the last position after each component, from the same forward.
    """
    f, c = _answer_dirs(model, batch.samples)
    logits, cache = model.run_with_cache(batch)
    stack, labels = cache.decompose_resid(layer=None, pos_slice=-1, mode="all", incl_embeds=True,
                                          return_labels=True)  # [component, batch, d_model]
    scale = cache["ln_final.hook_scale"][:, -1]  # [batch, 1]
    contrib = direct_effect(stack, answer_direction(model, batch.samples), scale)  # [component, batch]
    final = logits[:, -1].gather(1, f[:, None])[:, 0] - logits[:, -1].gather(1, c[:, None])[:, 0]
    if with_lens:
        lens = _lens_after_components(model, cache, f, c)
        if lens.shape[0] != len(labels):  # e.g. a learned positional embedding adds a component without a read-out
            raise AnswerError(f"The logit lens has {lens.shape[0]} read-outs for {len(labels)} components "
                              f"({labels[:3]} …); it needs embed + attention and MLP per layer.")
        return contrib, list(labels), final, lens
    return contrib, list(labels), final


def contributions(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 32, progress: bool = True
                  ) -> pd.DataFrame:
    """Tidy table: one row per (sample, component) with ``layer``, ``kind`` (embed/attn/mlp), ``contribution``.

    ``followed`` marks samples the model answers with the instructed modality (closed form), so the figure can
    split successful from failed samples. ``lens_follow`` / ``lens_comp``: the logit lens at the last position
    right after the component (the following and competitor answers' first-token logits read from the residual
    stream so far, with the final norm), which shows at which stage a failed sample's decision goes wrong.
    """
    rows = []
    for chunk, batch in iter_batches(model, samples, batch_size, desc="contributions", progress=progress):
        contrib, labels, final, lens = last_position_contributions(model, batch, with_lens=True)
        followed = following_scores(model, batch).followed
        for j, lab in enumerate(labels):
            kind = "embed" if lab == "embed" else ("attn" if "attn" in lab else "mlp")
            layer = -1 if lab == "embed" else int(lab.split("_")[0])
            for i, s in enumerate(chunk):
                rows.append({"sample_id": s.id, "condition": s.follow, "task": s.task,
                             "followed": bool(followed[i]), "component": lab, "kind": kind, "layer": layer,
                             "contribution": float(contrib[j, i]), "final_logit_diff": float(final[i]),
                             "lens_follow": float(lens[j, i, 0]), "lens_comp": float(lens[j, i, 1])})
    return pd.DataFrame(rows)


@torch.no_grad()
def anchor_readout(model: HookedMLLM, samples: Sequence[Any], groups: Sequence[str] = ("instruction", "last"),
                   batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Logit lens at token groups per layer; agreement of the decision read there with the final answer.

    Returns one row per (condition, group, layer): ``agreement`` (share of group tokens × samples whose
    lens decision equals the model's final decision), ``follow_rate`` (share deciding for the following answer),
    ``mean_logit_diff`` (following − competitor, first tokens), and the paper's **Latent Decision Alignment Rate**
    ``ldar``: the share of samples whose read-out decision at the group (the sign of the group's mean lens logit
    difference, following − competitor) equals the model's final decision, with its seeded bootstrap 95% interval
    over samples (``ldar_low``, ``ldar_high``; :func:`~modality_circuits.stats.bootstrap_ci`) and ``n_samples``.
    """
    from .stats import bootstrap_ci

    acc: dict[tuple, list[float]] = {}
    per_sample: dict[tuple, list[bool]] = {}
    for chunk, batch in iter_batches(model, samples, batch_size, desc="anchor read-out", progress=progress):
        f, c = _answer_dirs(model, chunk)
        final = following_scores(model, batch).followed  # [batch]
        names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
        _, cache = model.run_with_cache(batch, names_filter=names, return_type=None)
        # only the two answers' unembedding columns are needed: logit(f) − logit(c) = x · (W_U[:, f] − W_U[:, c])
        # + (b_U[f] − b_U[c]), without the [batch, pos, vocab] logits (49k columns for a real vocabulary)
        w_diff = (model.W_U[:, f] - model.W_U[:, c]).T  # [batch, d_model]
        b_diff = model.b_U[f] - model.b_U[c]  # [batch]
        for layer, name in enumerate(names):
            x = model.ln_final(cache[name])  # [batch, pos, d_model]
            diff = torch.einsum("bpd,bd->bp", x, w_diff) + b_diff[:, None]  # [batch, pos]
            for g in groups:
                m = batch.spans.mask(g, allow_empty=True)
                for i, s in enumerate(chunk):
                    d = diff[i][m[i]]
                    if d.numel() == 0:
                        continue
                    key = (s.follow, g, layer)
                    a = acc.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                    dec = d > 0
                    a[0] += float((dec == final[i]).float().sum())
                    a[1] += float(dec.float().sum())
                    a[2] += float(d.sum())
                    a[3] += d.numel()
                    per_sample.setdefault(key, []).append(bool((d.mean() > 0) == final[i]))
    rows = []
    for k, v in sorted(acc.items()):
        aligned = np.asarray(per_sample[k], dtype=float)  # [n_samples]
        lo, hi = bootstrap_ci(aligned)
        rows.append({"condition": k[0], "group": k[1], "layer": k[2], "agreement": v[0] / v[3],
                     "follow_rate": v[1] / v[3], "mean_logit_diff": v[2] / v[3], "n_tokens": int(v[3]),
                     "ldar": float(aligned.mean()), "ldar_low": lo, "ldar_high": hi, "n_samples": len(aligned)})
    return pd.DataFrame(rows)
