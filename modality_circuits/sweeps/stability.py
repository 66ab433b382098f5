"""Data-ratio stability of a sweep's curves (the rebuttal's "data scale" control).

The knockout curves are recomputed on nested subsets of the samples (by default 0.2, 0.4, 0.6, 0.8 and 1.0 of
them: one seeded permutation of the sample ids, each subset its first ``⌈f·n⌉`` ids, so every subset contains the
smaller ones) and each subset's curve is compared with the curve on all samples: Pearson correlation over the layer
windows and the largest absolute difference. No forward passes: it re-aggregates the sweep's per-sample rows.

Shapes: a curve is ``[n_windows]`` (the mean of ``value`` per layer window over the subset's samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import InterventionError

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


def nested_subsets(sample_ids: Sequence[str], fractions: Sequence[float] = FRACTIONS, seed: int = 0
                   ) -> dict[float, list[str]]:
    """``{fraction: ids}``: the first ``⌈fraction·n⌉`` ids of one seeded permutation (nested by construction)."""
    for f in fractions:
        if not 0 < f <= 1:
            raise InterventionError(f"Subset fractions must be in (0, 1], got {f}.")
    ids = list(dict.fromkeys(sample_ids))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {float(f): order[:max(1, math.ceil(f * len(ids)))] for f in sorted(fractions)}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def subset_stability(df: pd.DataFrame, value: str = "delta", fractions: Sequence[float] = FRACTIONS,
                     seed: int = 0, by: Sequence[str] = ("condition", "edge")) -> pd.DataFrame:
    """Per ``by`` group and fraction: how closely the subset's curve follows the full curve.

    Args:
        df: a sweep's per-sample table (``sample_id``, ``layer``, ``value`` and the ``by`` columns), e.g.
            :func:`~modality_circuits.sweeps.knockout.knockout_sweep`'s.

    Returns:
        Columns ``*by, fraction, n_samples, pearson_r, max_abs_diff`` (``pearson_r`` is NaN for a flat curve or a
        single window).
    """
    need = {"sample_id", "layer", value, *by}
    if not need <= set(df.columns):
        raise InterventionError(f"subset_stability needs the columns {sorted(need - set(df.columns))}.")
    subsets = nested_subsets(df["sample_id"].tolist(), fractions, seed)
    rows = []
    for key, g in df.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        full = g.groupby("layer")[value].mean()  # [n_windows]
        for f, ids in subsets.items():
            sub = g[g["sample_id"].isin(ids)]
            if sub.empty:
                continue
            curve = sub.groupby("layer")[value].mean().reindex(full.index)
            ok = curve.notna().to_numpy()
            a, b = curve.to_numpy()[ok], full.to_numpy()[ok]
            rows.append({**dict(zip(by, key)), "fraction": f, "n_samples": int(sub["sample_id"].nunique()),
                         "pearson_r": _pearson(a, b), "max_abs_diff": float(np.abs(a - b).max()) if ok.any()
                         else float("nan")})
    return pd.DataFrame(rows)


__all__ = ["FRACTIONS", "nested_subsets", "subset_stability"]
