"""Shared machinery of activation and path patching: metrics, prefix-reusing batched runs, patch hooks, results.

**Batched over patch targets.** ``k`` patch targets run in one forward over ``k`` copies of the base batch
(config-major: copy ``j`` is rows ``j·B … (j+1)·B − 1``); the hook of an activation replaces, in copy ``j`` only,
the entries of target ``j`` (:func:`patch_hook`).

**Prefix reuse.** A patch at layer ``l`` and positions ``≥ p`` leaves every layer ``< l`` and every position
``< p`` of the base run unchanged (attention is causal), so the copies start at layer ``l0`` (the smallest
patched layer of the chunk) from the base run's cached ``resid_pre[l0]``, and only positions ``p0 …`` are
recomputed, with the base run's keys/values of positions ``< p0`` as a KV cache
(:meth:`modality_circuits.engine.CleanRun.suffix_pass`, the engine every analysis shares). Image tokens never
pass the vision tower again. With the named metrics (which read only the last position's logits) the final block
runs attention and MLP only at the last position and just keys/values elsewhere (``last_only``).

**Metrics** (:class:`PairMetric` over :mod:`modality_circuits.metrics`), computed per copy as the mean over the
pair's rows:

* ``"logit_diff"``: ``logp(clean answer) − logp(corrupted answer)`` (full answers as continuations of the
  prompt, or first tokens only with ``first_token=True``, where it is the first-token logit difference);
* ``"p_binary"``: ``σ(logit_diff)``, the binary following score (probability of the clean answer among the two);
* a callable ``f(logits [batch, pos, vocab]) -> scalar`` (TransformerLens style; full-length logits).

Normalised scores map the corrupted run to 0 and the clean run to 1: ``(m − m_corr) / (m_clean − m_corr)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import AnswerError, InterventionError, NumericalError
from ..interventions.core import align_rows
from ..metrics import MetricLike, PromptPass, as_metric, tokenize_answer
from ..models.forward_state import current
from ..prompts import MLLMBatch
from .pairs import PatchPair

logger = logging.getLogger(__name__)

METRICS = ("logit_diff", "p_binary")
DIRECTIONS = ("denoise", "noise")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InterventionError(f"direction must be one of {DIRECTIONS} ('denoise': clean activations into the "
                                f"corrupted run; 'noise': corrupted into clean); got {direction!r}.")
    return direction


def base_and_source(pair: PatchPair, direction: str) -> tuple[MLLMBatch, MLLMBatch]:
    """``(batch that runs, batch activations are taken from)`` for a direction."""
    return (pair.corrupted, pair.clean) if check_direction(direction) == "denoise" else (pair.clean, pair.corrupted)


# ------------------------------------------------------------------------------------------------ metric
class PairMetric:
    """A :class:`~modality_circuits.metrics.Metric` bound to a pair, reduced to one value per copy (the mean over
    the pair's rows). Named answer metrics score the pair's ``(clean answer, corrupted answer)``."""

    def __init__(self, model: Any, pair: PatchPair, metric: MetricLike = "logit_diff", first_token: bool = False):
        self.model, self.pair = model, pair
        named = isinstance(metric, str)
        if named and metric not in METRICS:
            raise InterventionError(f"Unknown metric {metric!r}; use one of {METRICS}, a Metric, or a callable "
                                    "f(logits [batch, pos, vocab]) -> scalar.")
        if named and pair.answers is None:
            raise AnswerError("The pair carries no answers; build it from samples, pass answers=[(clean, corrupted), "
                              "…] to PatchPair, or use a callable metric on logits.")
        self.metric = as_metric(metric, first_token=first_token if named else None,
                                answers=pair.answers if named else None)
        self.name = metric if named else self.metric.name
        if named and first_token:
            for i, (a, b) in enumerate(pair.answers):
                if tokenize_answer(model.tokenizer, a)[0] == tokenize_answer(model.tokenizer, b)[0]:
                    raise AnswerError(f"Row {i}: the two answers {pair.answers[i]} share their first token; the "
                                      "first-token metric is 0 there. Use first_token=False or other answers.")
        self.needs_cache = self.metric.needs_cache(model, pair.clean)
        self.reads_last_only = self.metric.reads_last_only

    @torch.no_grad()
    def score(self, batch: MLLMBatch) -> float:
        """The metric of an unpatched run of ``batch``."""
        return float(self.metric(self.model, batch).float().mean())

    @torch.no_grad()
    def evaluate(self, run: PromptPass, k: int, base_batch: MLLMBatch, prefix_logits: Tensor | None = None
                 ) -> Tensor:
        """Metric of each of ``k`` copies of ``base_batch``, ``Float[Tensor, "k"]``.

        Args:
            run: a prompt pass over the ``k`` copies returning ``(logits of the positions it ran, KV cache)``.
            prefix_logits: ``[batch, p0, vocab]`` logits of the positions the run skipped (logits metrics see
                full-length logits).
        """
        vals = self.metric(self.model, base_batch, prompt_pass=run, copies=k, clean_logits=prefix_logits)
        if not torch.isfinite(vals).all():
            raise NumericalError("Patched metric values contain NaN/inf; check the model dtype (float32).")
        return vals.float().mean(1).cpu()


def normalise(raw: Tensor, clean: float, corrupted: float) -> Tensor:
    """``(raw − corrupted) / (clean − corrupted)``: 0 = corrupted run, 1 = clean run (NaN if they are equal)."""
    gap = clean - corrupted
    if abs(gap) < 1e-9:
        logger.warning("The clean and corrupted runs have the same metric (%.4g); normalised scores are NaN. Use a "
                       "pair whose answers the two runs prefer differently.", clean)
        return torch.full_like(raw, float("nan"))
    return (raw - corrupted) / gap


# ------------------------------------------------------------------------------------------------ hooks
#: How a site mask in prompt coordinates maps onto an activation:
#: ``pos`` [rows, pos, …] masks [rows, pos]; ``head`` [rows, pos, head, d] masks [rows, pos, head];
#: ``pattern`` [rows, head, q_pos, k_pos] masks [rows, head, q_pos]; ``image`` [img_tok, d] masks [rows, pos].
SITE_KINDS = ("pos", "head", "pattern", "image")


def patch_hook(model: Any, kind: str, mask: Tensor, src: Tensor, prompt_len: int, fallback: Tensor | None = None,
               image_mask: Tensor | None = None) -> Callable[..., Tensor]:
    """A hook writing ``src`` where ``mask`` is True (and ``fallback``, if given, everywhere else).

    ``mask`` has one row per run row (``k·B``); ``src``/``fallback`` are in prompt coordinates with ``B`` or
    ``k·B`` rows (repeated config-major). Activations of positions beyond the prompt (answer continuations) pass
    unchanged; a KV-cached run's first query is absolute position ``ForwardState.offset`` of the running forward.
    """
    n_rows = mask.shape[0]

    def hook(act: Tensor, hook: Any) -> Tensor:
        off = current().offset
        if off >= prompt_len:
            return act
        if kind == "image":
            sel = mask[image_mask.to(mask.device)]  # [k·img_tok] in masked_scatter order (row-major)
            if sel.shape[0] != act.shape[0]:
                raise InterventionError(f"Image patch met {act.shape[0]} image-token features, expected "
                                        f"{sel.shape[0]}; the clean and corrupted image groups must align.")
            s = align_rows(src.to(act.device, act.dtype), act.shape[0])
            other = act if fallback is None else align_rows(fallback.to(act.device, act.dtype), act.shape[0])
            return torch.where(sel[:, None].to(act.device), s, other)
        if act.shape[0] != n_rows:
            raise InterventionError(f"A patch built for {n_rows} rows met an activation with {act.shape[0]} rows.")
        pdim = 2 if kind == "pattern" else 1
        q = act.shape[pdim]
        m = mask.narrow(pdim, off, q).to(act.device)
        if fallback is None:  # sparse write (in place, as TransformerLens's patch setters do)
            idx = m.nonzero(as_tuple=True)
            if not len(idx[0]):
                return act
            rows = idx[0] % src.shape[0]
            sidx = (rows, idx[1] + off, *idx[2:]) if kind != "pattern" else (rows, idx[1], idx[2] + off)
            vals = src[sidx].to(act.device, act.dtype)
            act[idx] = vals[..., :act.shape[3]] if kind == "pattern" else vals
            return act
        s = align_rows(src.to(act.device), n_rows).narrow(pdim, off, q)
        other = act if fallback is None else align_rows(fallback.to(act.device), n_rows).narrow(pdim, off, q)
        if kind == "pattern":
            s, other = s[..., :act.shape[3]], other[..., :act.shape[3]]
        m = m.reshape(m.shape + (1,) * (act.dim() - m.dim()))
        return torch.where(m, s.to(act.dtype), other.to(act.dtype))

    return hook


def first_position(site: Tensor, kind: str) -> int:
    """First prompt position a site mask touches (the sequence length if empty)."""
    if kind == "pattern":
        pos = site.any(0).any(0) if site.dim() == 3 else site.any(0)
    else:
        pos = site.reshape(site.shape[0], site.shape[1], -1).any(-1).any(0)
    idx = pos.nonzero().flatten()
    return int(idx[0]) if len(idx) else int(pos.shape[0])


def chunks(n_items: int, batch_rows: int, max_rows: int) -> list[range]:
    """Consecutive chunks of items so that ``len(chunk) · batch_rows <= max_rows`` (at least one item each)."""
    k = max(1, int(max_rows) // max(1, batch_rows))
    return [range(i, min(i + k, n_items)) for i in range(0, n_items, k)]


# ----------------------------------------------------------------------------------------------- result
@dataclass
class PatchResult:
    """Patching scores with their axes.

    Attributes:
        values: the (normalised, unless ``normalize=False``) scores; one dimension per entry of ``axes``.
        raw: the metric of every patched run (same shape).
        axes: axis names, e.g. ``("layer", "pos")``, ``("layer", "head")``, ``("layer", "pos", "head")``.
        labels: per axis, the label of each index (layers, heads, ``"12 ▁image"`` tokens, group names).
        clean, corrupted: the metric of the unpatched clean and corrupted runs.
        component, metric, direction: what was patched, how it was scored, which way (``denoise``/``noise``).
        pos_groups: for a ``pos`` axis, the token group of each position (row 0).
    """

    values: Tensor
    raw: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[Any]]
    clean: float
    corrupted: float
    component: str
    metric: str
    direction: str = "denoise"
    pos_groups: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def effect(self) -> Tensor:
        """Share of the clean−corrupted gap the patch moves: ``values`` (denoise) or ``1 − values`` (noise)."""
        return self.values if self.direction == "denoise" else 1 - self.values

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per patch target (axis labels, ``value``, ``raw``)."""
        if self.shape:
            idx = np.array(np.meshgrid(*[np.arange(s) for s in self.shape], indexing="ij")).reshape(len(self.shape), -1)
            df = pd.DataFrame({a: [self.labels[a][i] for i in idx[d]] for d, a in enumerate(self.axes)})
        else:
            df = pd.DataFrame(index=[0])
        df["value"] = self.values.reshape(-1).numpy()
        df["raw"] = self.raw.reshape(-1).numpy()
        df["component"], df["metric"], df["direction"] = self.component, self.metric, self.direction
        return df


def position_labels(model: Any, batch: MLLMBatch, positions: Sequence[int], row: int = 0) -> list[str]:
    """Unique labels ``"<pos> <token>"`` of padded positions (row ``row``; image tokens ``<img_k>``)."""
    ids = batch.tokens[row].tolist()
    att = batch.attention_mask[row].tolist()
    img = getattr(getattr(model, "image_encoder", None), "image_token_id", None)
    out = []
    for p in positions:
        if not att[p]:
            tok = "<pad>"
        elif ids[p] == img:
            tok = f"<img_{sum(1 for q in range(p) if ids[q] == img and att[q])}>"
        else:
            tok = str(model.tokenizer.convert_ids_to_tokens(int(ids[p])))
        out.append(f"{p} {tok}")
    return out


def position_groups(batch: MLLMBatch, positions: Sequence[int], row: int = 0) -> list[str]:
    """The segment group of each position of row ``row`` (``pad`` for masked positions)."""
    names = [n for n in batch.spans.names if n not in ("image", "last")]
    out = []
    for p in positions:
        hit = [n for n in names if bool(batch.spans.masks[n][row, p])]
        out.append(hit[0] if hit and bool(batch.attention_mask[row, p]) else "pad")
    return out


__all__ = ["DIRECTIONS", "METRICS", "PairMetric", "PatchResult", "base_and_source", "chunks", "first_position",
           "normalise", "patch_hook", "position_groups", "position_labels"]
