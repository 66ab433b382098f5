"""Work units: a sharded, interrupted and resumed knockout sweep merges to the single-process table, no unit lost or
duplicated; another plan in the same directory is refused; a failing unit is retried, then named."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from modality_circuits.data.synthetic import synthetic
from modality_circuits.errors import ModalityCircuitsError
from modality_circuits.sweeps.knockout import knockout_sweep
from modality_circuits.sweeps.units import LOG, UnitStore, WorkUnit, parse_shard, plan_units, run_units

EDGES = [("image", "last"), ("random0~instruction", "last")]


def test_plans_and_shards() -> None:
    units = plan_units(["a", "b", "c", "d", "e"], 2)
    assert [u.sample_ids for u in units] == [("a", "b"), ("c", "d"), ("e",)]
    assert [u.name for u in units] == ["unit-00000", "unit-00001", "unit-00002"]
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ModalityCircuitsError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ModalityCircuitsError, match="not unique"):
        plan_units(["a", "a"], 1)


def test_sharded_interrupted_resumed_sweep_equals_one_pass(circuit_model, tmp_path, monkeypatch) -> None:
    model = circuit_model
    samples = synthetic(10, seed=3, kind="conflict")
    kw = dict(edges=EDGES, centers=[0, 1], batch_size=3, progress=False, seed=5)
    whole = knockout_sweep(model, samples, **kw)
    d = tmp_path / "units"
    assert knockout_sweep(model, samples, units_dir=d, shard=(0, 2), **kw) is None  # units 0 and 2 of 0-3
    assert sorted(p.name for p in d.glob("unit-*")) == ["unit-00000.parquet", "unit-00002.parquet"]

    import modality_circuits.sweeps.knockout as ko

    real, calls = ko._sweep_batch, []

    def dies_on_second(*a, **k):  # the worker is lost after one unit of shard 1
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ko, "_sweep_batch", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        knockout_sweep(model, samples, units_dir=d, shard=(1, 2), **kw)
    monkeypatch.setattr(ko, "_sweep_batch", real)
    assert len(list(d.glob("unit-*"))) == 3 and not list(d.glob(".*tmp"))  # no partial file
    merged = knockout_sweep(model, samples, units_dir=d, **kw)  # the rest, then the merge
    pd.testing.assert_frame_equal(merged, whole)
    assert not merged.duplicated(["sample_id", "edge", "layer"]).any()
    with pytest.raises(ModalityCircuitsError, match="units of another sweep"):
        knockout_sweep(model, samples, units_dir=d, **{**kw, "seed": 6})


def test_a_failing_unit_is_retried_then_named(tmp_path) -> None:
    units = plan_units(["a", "b", "c"], 1)
    store = UnitStore(tmp_path, units, {"sweep": "test"})
    attempts: dict[str, int] = {}

    def work(u: WorkUnit) -> pd.DataFrame:
        attempts[u.name] = attempts.get(u.name, 0) + 1
        if u.sample_ids == ("b",) or (u.sample_ids == ("c",) and attempts[u.name] == 1):
            raise RuntimeError("CUDA error: device lost")
        return pd.DataFrame({"sample_id": list(u.sample_ids), "x": [1.0]})

    with pytest.raises(ModalityCircuitsError, match=r"1 work unit\(s\) failed after 2 attempt\(s\) each: unit-00001"):
        run_units(store, work, retries=1, progress=False)
    assert attempts == {"unit-00000": 1, "unit-00001": 2, "unit-00002": 2}  # c recovered on its retry
    log = [json.loads(x) for x in (tmp_path / LOG).read_text().splitlines()]
    assert [(r["unit"], r["status"], r["attempt"]) for r in log] == [
        ("unit-00000", "done", 0), ("unit-00001", "failed", 0), ("unit-00001", "failed", 1),
        ("unit-00002", "failed", 0), ("unit-00002", "done", 1)]
    assert log[1]["error"] == "RuntimeError: CUDA error: device lost" and log[0]["shard"] == "0/1"
    pr = store.progress()
    assert (pr["done"], pr["total"]) == (2, 3) and pr["eta_s"] == pytest.approx(
        (log[0]["seconds"] + log[4]["seconds"]) / 2, abs=1e-3)
    assert store.missing() == ["unit-00001"]
    with pytest.raises(ModalityCircuitsError, match="1 of 3 work units .* not done yet: unit-00001"):
        store.merge()
    out = run_units(store, lambda u: pd.DataFrame({"sample_id": list(u.sample_ids), "x": [2.0]}), progress=False)
    assert out["ran"] == ["unit-00001"] and out["skipped"] == ["unit-00000", "unit-00002"]
    assert store.merge()["x"].tolist() == [1.0, 2.0, 1.0]
