"""Data-ratio stability: nested seeded subsets, and correlations computed from the per-sample rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modality_circuits.errors import InterventionError
from modality_circuits.sweeps.stability import nested_subsets, subset_stability


def _table(n: int = 50, layers: int = 6, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Per-sample rows whose mean curve is a known shape per edge, plus per-sample noise."""
    rng = np.random.default_rng(seed)
    shape = {"a↛b": -np.sin(np.linspace(0, np.pi, layers)), "c↛d": np.linspace(-1, 0, layers)}
    rows = []
    for i in range(n):
        for edge, curve in shape.items():
            for layer in range(layers):
                rows.append({"sample_id": f"s{i}", "condition": "image" if i % 2 else "text", "edge": edge,
                             "layer": layer, "delta": curve[layer] + noise * rng.normal()})
    return pd.DataFrame(rows)


def test_subsets_are_nested_seeded_and_sized() -> None:
    ids = [f"s{i}" for i in range(23)]
    sub = nested_subsets(ids, seed=1)
    assert [len(v) for v in sub.values()] == [5, 10, 14, 19, 23]  # ⌈f·23⌉
    fr = sorted(sub)
    assert all(set(sub[a]) <= set(sub[b]) for a, b in zip(fr, fr[1:]))
    assert sub == nested_subsets(ids, seed=1) and sub != nested_subsets(ids, seed=2)
    assert sorted(sub[1.0]) == sorted(ids)
    with pytest.raises(InterventionError, match="fractions"):
        nested_subsets(ids, fractions=(0.0, 1.0))


def test_identical_samples_give_perfect_stability() -> None:
    st = subset_stability(_table(noise=0.0))
    assert set(st["fraction"]) == {0.2, 0.4, 0.6, 0.8, 1.0}
    assert np.allclose(st["pearson_r"], 1.0) and np.allclose(st["max_abs_diff"], 0.0, atol=1e-12)
    full = st[st["fraction"] == 1.0]
    assert (full["n_samples"] == 25).all()  # per condition: half of 50


def test_noise_lowers_small_subsets_more_than_large_ones() -> None:
    st = subset_stability(_table(n=200, noise=2.0, seed=3))
    r = st.groupby("fraction")["pearson_r"].mean()
    assert r[1.0] == pytest.approx(1.0) and r[0.2] < r[0.8] <= 1.0
    d = st.groupby("fraction")["max_abs_diff"].mean()
    assert d[0.2] > d[0.8] > d[1.0] == 0


def test_hand_computed_correlation() -> None:
    df = _table(n=10, noise=1.0, seed=5)
    st = subset_stability(df, fractions=(0.5, 1.0), seed=4)
    ids = nested_subsets(df["sample_id"].tolist(), (0.5, 1.0), seed=4)[0.5]
    g = df[(df["condition"] == "image") & (df["edge"] == "a↛b")]
    full = g.groupby("layer")["delta"].mean()
    part = g[g["sample_id"].isin(ids)].groupby("layer")["delta"].mean()
    row = st[(st["condition"] == "image") & (st["edge"] == "a↛b") & (st["fraction"] == 0.5)].iloc[0]
    assert row["pearson_r"] == pytest.approx(np.corrcoef(part, full)[0, 1])
    assert row["max_abs_diff"] == pytest.approx(np.abs(part - full).max())


def test_flat_curve_and_missing_columns() -> None:
    df = _table(n=6)
    df["delta"] = 0.0
    assert subset_stability(df)["pearson_r"].isna().all()
    with pytest.raises(InterventionError, match="needs the columns"):
        subset_stability(df.drop(columns=["layer"]))
