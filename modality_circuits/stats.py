"""Confidence intervals for the study's curves and tables: seeded percentile bootstrap over samples.

Every mean the study reports (a knockout curve's point, a contribution, an MFR under blocking, a restore rate, an
agreement rate of the anchor read-out) is a mean over samples; its interval resamples those samples with replacement
``n_boot`` times and takes the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resampled means
(Efron's percentile interval). A fixed ``seed`` makes the intervals reproducible. ``ci="normal"`` gives the
normal-approximation interval ``mean ± 1.96·sd/√n`` instead (the earlier default).

Shapes: ``values`` is ``[n_samples]``; :func:`bootstrap_means` draws ``[n_boot]`` means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Defaults of every interval in the study (recorded in the report).
N_BOOT = 2000
LEVEL = 0.95
CI_METHODS = ("bootstrap", "normal")


def bootstrap_means(values: Any, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot]`` means of ``values`` (``[n]``, NaNs dropped) resampled with replacement (seeded)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return np.full(n_boot, np.nan)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))  # [n_boot, n]
    return v[idx].mean(1)


def bootstrap_ci(values: Any, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval ``(low, high)`` of the mean of ``values`` (``[n]``; NaNs dropped).

    One value gives a zero-width interval at it; no values give ``(nan, nan)``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    means = bootstrap_means(values, n_boot, seed)
    if np.isnan(means).all():
        return float("nan"), float("nan")
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarize(df: pd.DataFrame, value: str, by: Sequence[str], ci: str = "bootstrap", n_boot: int = N_BOOT,
              level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Mean, std, count and a ``level`` interval of ``value`` per group of ``by`` (tidy, one row per group).

    ``ci="bootstrap"`` (default): seeded percentile bootstrap over the group's rows; ``"normal"``:
    ``mean ± z·sd/√n``. Columns: ``*by, mean, std, count, ci_low, ci_high``.
    """
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {CI_METHODS}, got {ci!r}.")
    g = df.groupby(list(by), sort=False)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    if ci == "normal":
        from statistics import NormalDist

        z = NormalDist().inv_cdf(0.5 + level / 2)
        half = z * out["std"].fillna(0) / np.sqrt(out["count"].clip(lower=1))
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
        return out
    bounds = [bootstrap_ci(vals.to_numpy(), n_boot, level, seed) for _, vals in g]
    out["ci_low"] = [b[0] for b in bounds]
    out["ci_high"] = [b[1] for b in bounds]
    return out


__all__ = ["CI_METHODS", "LEVEL", "N_BOOT", "bootstrap_ci", "bootstrap_means", "summarize"]
