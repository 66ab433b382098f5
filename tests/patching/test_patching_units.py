"""Patching per layer as work units: a sweep split into one-layer units (resumed after a stop) equals the one-call
table of the whole sweep, for the instruction-flip group patching and the image path patching."""

from __future__ import annotations

import pandas as pd

from modality_circuits.data.synthetic import synthetic
from modality_circuits.patching import GroupResid, ResidAt, image_swap, path_patch
from modality_circuits.patching.units import flip_patching, image_path_patching


def test_layer_units_equal_the_whole_sweep(circuit_model, tmp_path) -> None:
    model = circuit_model
    samples = synthetic(8, seed=4, kind="conflict")
    picked = samples[:4]
    whole = flip_patching(model, picked, [0, 1, 2])  # one unit: every layer in one call
    assert sorted(set(whole["layer"])) == [0, 1, 2] and whole["group"].nunique() > 3
    d = tmp_path / "flip"
    first = flip_patching(model, picked, [0, 1, 2], per_unit=1, units_dir=d)
    pd.testing.assert_frame_equal(first, whole)
    (d / "unit-00001.parquet").unlink()  # a unit lost: the rerun computes only that one
    again = flip_patching(model, picked, [0, 1, 2], per_unit=1, units_dir=d)
    pd.testing.assert_frame_equal(again, first)

    vis = [s for s in samples if s.follow == "image"]
    donors = vis[1:] + vis[:1]  # each sample with another sample's image
    keep = [i for i, (s, dn) in enumerate(zip(vis, donors)) if s.task == dn.task]
    vs, ds = [vis[i] for i in keep] or vis[:1], [donors[i] for i in keep] or donors[:1]
    path = image_path_patching(model, vs, ds, [1, 2, 3], units_dir=tmp_path / "path")
    assert list(path["layer"]) == [1, 1, 2, 2, 3, 3] and list(path["receiver"][:2]) == ["instruction", "last"]
    ref = path_patch(model, image_swap(model, vs, ds), GroupResid("image", 0), ResidAt("last", 2))
    assert float(path[(path["layer"] == 2) & (path["receiver"] == "last")]["value"].iloc[0]) == float(ref.values)
