"""Shared parts of activation and path patching: the pair-bound metric, normalisation, results, labels.

**Batched over patch targets.** Every patch target is a :class:`~modality_circuits.interventions.Patch`;
``k`` of them run in one forward of the engine (:func:`modality_circuits.engine.run`) over ``k`` copies of the base
batch (config-major: copy ``j`` is rows ``j·B … (j+1)·B − 1`` and carries target ``j``).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import AnswerError, InterventionError
from ..metrics import MetricLike, as_metric, tokenize_answer
from ..prompts import MLLMBatch
from .pairs import PatchPair

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

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

    def __init__(self, model: HookedMLLM, pair: PatchPair, metric: MetricLike = "logit_diff",
                 first_token: bool = False):
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


def normalise(raw: Tensor, clean: float, corrupted: float) -> Tensor:
    """``(raw − corrupted) / (clean − corrupted)``: 0 = corrupted run, 1 = clean run (NaN if they are equal)."""
    gap = clean - corrupted
    if abs(gap) < 1e-9:
        logger.warning("The clean and corrupted runs have the same metric (%.4g); normalised scores are NaN. Use a "
                       "pair whose answers the two runs prefer differently.", clean)
        return torch.full_like(raw, float("nan"))
    return (raw - corrupted) / gap


# ------------------------------------------------------------------------------------------------ hooks
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

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> PatchResult:
        """The result back from its tidy table (:meth:`to_frame`), e.g. read from a run's CSV: the axes are the
        columns before ``value``, in order."""
        cols = list(df.columns)
        axes = tuple(cols[:cols.index("value")])
        labels = {a: list(dict.fromkeys(df[a].tolist())) for a in axes}
        shape = tuple(len(labels[a]) for a in axes)
        values, raw = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        for _, r in df.iterrows():
            idx = tuple(labels[a].index(r[a]) for a in axes)
            values[idx], raw[idx] = float(r["value"]), float(r["raw"])
        first = df.iloc[0] if len(df) else {}
        return cls(values, raw, axes, labels, float("nan"), float("nan"), str(first.get("component", "?")),
                   str(first.get("metric", "?")), str(first.get("direction", "denoise")))

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


def position_labels(model: HookedMLLM, batch: MLLMBatch, positions: Sequence[int], row: int = 0) -> list[str]:
    """Unique labels ``"<pos> <token>"`` of padded positions (row ``row``; image tokens ``<img_k>``)."""
    ids = batch.tokens[row].tolist()
    real = [p for p, a in enumerate(batch.attention_mask[row].tolist()) if a]
    labels = dict(zip(real, model.token_labels([ids[p] for p in real])))
    return [f"{p} {labels.get(p, '<pad>')}" for p in positions]


def position_groups(batch: MLLMBatch, positions: Sequence[int], row: int = 0) -> list[str]:
    """The segment group of each position of row ``row`` (``pad`` for masked positions)."""
    names = [n for n in batch.spans.names if n not in ("image", "last")]
    out = []
    for p in positions:
        hit = [n for n in names if bool(batch.spans.masks[n][row, p])]
        out.append(hit[0] if hit and bool(batch.attention_mask[row, p]) else "pad")
    return out


__all__ = ["DIRECTIONS", "METRICS", "PairMetric", "PatchResult", "base_and_source", "chunks", "normalise",
           "position_groups", "position_labels"]
