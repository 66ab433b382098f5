"""Knockout sweep: layers (or layer windows) × edges ``src ↛ dst`` × samples, as a tidy table.

A thin wrapper over the engine (:func:`modality_circuits.engine.run`): every (window, edge) is a
:class:`~modality_circuits.interventions.Knockout`; for every batch the clean run is recorded once, and
knockouts sharing a first layer and destination group run side by side in one batched forward that starts at
that layer and the group's first position. The default metric is the binary-constrained following probability
(any :class:`~modality_circuits.metrics.Metric` works); the effect is the paper's relative change
``Δ = (value − base) / base``.

**Unconstrained variant** (the rebuttal's check of the binary constraint). With a named answer metric the sweep
reads both answers' log-probabilities once and also reports, from the same forward, the unconstrained
``P(following answer)`` (``p_follow``, its relative change ``p_follow_delta``) and the probability left outside
both answers, ``p_outside = 1 − P(f) − P(c)`` (full answers; with multi-token answers their sequence
probabilities), before (``*_base``) and under each knockout.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..engine import CleanRun, baseline, chunked, run
from ..errors import SpanError
from ..interventions.core import check_layers, layer_window
from ..interventions.knockout import Knockout
from ..metrics import AnswerMetric, Metric, MetricLike, as_metric, relative_change
from ..prompts import MLLMBatch
from ..spans import with_random_groups
from .units import sweep_in_units

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

#: The paper's edges (src, dst): information moving into the instruction anchors and into the last position,
#: plus controls into the format sentence and from the system prompt.
DEFAULT_EDGES: tuple[tuple[str, str], ...] = (
    ("image", "context"), ("image", "instruction"), ("context", "instruction"),
    ("image", "last"), ("context", "last"), ("instruction", "last"),
    ("image", "constraint"), ("context", "constraint"), ("system", "last"),
)


def edge_name(src: str, dst: str) -> str:
    return f"{src}↛{dst}"


def _configs(n_layers: int, centers: Sequence[int], edges: Sequence[tuple[str, str]], window: int, mode: str
             ) -> list[dict]:
    out = []
    for center in centers:
        win = layer_window(center, window, n_layers, mode)
        for src, dst in edges:
            out.append({"layer": center, "layers": win, "src": src, "dst": dst,
                        "iv": Knockout(src, dst, win, allow_empty=True)})
    return out


def _check_groups(batch: MLLMBatch, edges: Sequence[tuple[str, str]]) -> None:
    for src, dst in edges:
        for g in (src, dst):
            if g not in batch.spans:
                raise SpanError(f"Edge {edge_name(src, dst)}: the prompts have no group {g!r}. "
                                f"Available groups: {batch.spans.names}.")


def _both_answers(metric: Metric) -> AnswerMetric | None:
    """The log-probability metric that also gives the unconstrained variant, for a named answer metric."""
    if isinstance(metric, AnswerMetric) and metric.kind in ("p_binary", "p_follow", "logit_diff"):
        return AnswerMetric("logprobs", first_token=metric.first_token, answers=metric.answers)
    return None


def _from_logprobs(lp: torch.Tensor, kind: str, first_token: bool) -> dict[str, torch.Tensor]:
    """``lp``: ``[..., 4]`` (logp f, logp c, first-token logp f, first-token logp c) -> the metric and variants."""
    f, c = (lp[..., 2], lp[..., 3]) if first_token else (lp[..., 0], lp[..., 1])
    value = {"p_binary": torch.sigmoid(f - c), "p_follow": f.exp(), "logit_diff": f - c}[kind]
    return {"value": value, "p_follow": f.exp(), "p_outside": 1 - f.exp() - c.exp()}


@torch.no_grad()
def _sweep_batch(model: HookedMLLM, batch: MLLMBatch, configs: list[dict], metric: Metric, max_configs: int
                 ) -> list[dict]:
    clean = CleanRun.record(model, batch)
    lp_metric = _both_answers(metric)
    scored = lp_metric or metric
    variants: dict[str, torch.Tensor] = {}
    base = baseline(model, clean, scored)  # [batch] (or [batch, 4] of log-probabilities)
    if lp_metric is not None:
        variants = _from_logprobs(base, metric.kind, metric.first_token)
        base = variants["value"]
    # configurations that share a first layer and destination share a prefix: run them side by side
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for ci, c in enumerate(configs):
        groups[(c["iv"].first_layer(model), c["iv"].first_position(batch))].append(ci)
    results: dict[int, torch.Tensor] = {}
    for cis in groups.values():
        for part in chunked(cis, max_configs):
            vals = run(model, clean, [configs[ci]["iv"] for ci in part], scored)  # [config, batch (, 4)]
            for k, ci in enumerate(part):
                results[ci] = vals[k]
    rows = []
    for ci, c in enumerate(configs):
        extra: dict[str, torch.Tensor] = {}
        if lp_metric is not None:
            extra = _from_logprobs(results[ci], metric.kind, metric.first_token)
            results[ci] = extra["value"]
        delta = relative_change(base, results[ci])
        p_delta = relative_change(variants["p_follow"], extra["p_follow"]) if extra else None
        for i, smp in enumerate(batch.samples):
            row = {"sample_id": smp.id, "condition": smp.follow, "task": smp.task, "kind": smp.kind,
                   "edge": edge_name(c["src"], c["dst"]), "src": c["src"], "dst": c["dst"],
                   "layer": c["layer"], "layers": ",".join(map(str, c["layers"])), "metric": metric.name,
                   "base": float(base[i]), "value": float(results[ci][i]), "delta": float(delta[i])}
            if extra:
                row.update({"p_follow_base": float(variants["p_follow"][i]), "p_follow": float(extra["p_follow"][i]),
                            "p_follow_delta": float(p_delta[i]),
                            "p_outside_base": float(variants["p_outside"][i]),
                            "p_outside": float(extra["p_outside"][i])})
            rows.append(row)
    return rows


def knockout_sweep(model: HookedMLLM, samples: Sequence[Any], edges: Sequence[tuple[str, str]] = DEFAULT_EDGES,
                   centers: Sequence[int] | None = None, window: int = 1, window_mode: str = "centered",
                   batch_size: int = 16, metric: MetricLike = "p_binary", first_token: bool = False,
                   max_configs: int = 64, progress: bool = True, seed: int = 0, units_dir: str | Path | None = None,
                   shard: tuple[int, int] | None = None, retries: int = 1, executor: Any = None
                   ) -> pd.DataFrame | None:
    """Run the knockout sweep; one row per (sample, edge, window centre).

    Args:
        edges: ``(src, dst)`` group pairs; ``src ↛ dst`` blocks ``dst`` queries from ``src`` keys. A group named
            ``random<k>~<group>`` is a random control set of the group's size (:mod:`modality_circuits.spans`),
            e.g. ``("image", "random0~instruction")``; ``seed`` seeds those sets.
        centers: window centres (or starts, ``window_mode="start"``); default every layer.
        window / window_mode: ``k`` layers ``"centered"`` on the centre or ``"start"``-ing at it.
        metric: any :class:`~modality_circuits.metrics.Metric` or name (default: the binary following probability).
        first_token: score first answer tokens only (for a named metric).
        max_configs: configurations per batched forward (rows = ``max_configs × batch_size``).
        units_dir: make the sweep resumable and shardable (:mod:`modality_circuits.sweeps.units`): one work unit
            per batch of samples, its rows in ``units_dir/unit-NNNNN.parquet``; units already there are skipped.
        shard: ``(i, N)``: run only units ``i, i + N, …`` (with ``units_dir``); ``retries``: extra attempts of a
            failed unit.
        executor: where the units run (with ``units_dir``): ``"local"`` (default) or a Ray / Slurm executor
            (:mod:`modality_circuits.sweeps.executors`).

    Returns:
        Columns ``sample_id, condition, task, kind, edge, src, dst, layer (the centre), layers, metric, base,
        value, delta`` with ``delta = (value − base) / base``; for a named answer metric also ``p_follow_base,
        p_follow, p_follow_delta, p_outside_base, p_outside`` (the unconstrained variant, same forward). Aggregate with
        :func:`modality_circuits.stats.summarize` (mean and bootstrap 95% CI). With ``units_dir``: the merged
        table once every unit is done (the same rows as without it), None while other shards' units are missing.
    """
    met = as_metric(metric, first_token=first_token)
    centers = check_layers(model, list(range(model.cfg.n_layers)) if centers is None else centers)
    configs = _configs(model.cfg.n_layers, centers, edges, window, window_mode)
    params = {"sweep": "knockout", "edges": [list(e) for e in edges], "centers": list(centers), "window": window,
              "window_mode": window_mode, "metric": met.name, "seed": seed}
    kwargs = {"configs": configs, "edges": list(edges), "metric": met, "max_configs": max_configs, "seed": seed,
              "batch_size": batch_size}
    return sweep_in_units(model, samples, knockout_rows, kwargs, params, units_dir, batch_size, shard, retries,
                          progress, "knockout sweep", executor)


def knockout_rows(model: HookedMLLM, samples: Sequence[Any], *, configs: list[dict], edges: Sequence[tuple[str, str]],
                  metric: Metric, max_configs: int, seed: int, batch_size: int) -> pd.DataFrame:
    """The rows of ``samples`` (one work unit), ``batch_size`` at a time."""
    rows = []
    for i in range(0, len(samples), batch_size):
        batch = model.prepare(list(samples[i:i + batch_size]))
        batch.spans = with_random_groups(batch.spans, [g for e in edges for g in e], [s.id for s in batch.samples],
                                         seed)
        _check_groups(batch, edges)
        rows += _sweep_batch(model, batch, configs, metric, max_configs)
    return pd.DataFrame(rows)
