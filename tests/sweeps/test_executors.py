"""Executors: a knockout sweep run by Ray (a local instance, 2 CPU workers) and by submitit's local executor (a
2-job array) merges to the single-process table; a Ray worker killed mid-sweep is replaced and the sweep completes
with the same rows, no unit lost or duplicated; a sweep stopped after some units is finished by another executor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from modality_circuits.data.synthetic import synthetic
from modality_circuits.errors import ModalityCircuitsError
from modality_circuits.models import HookedMLLM
from modality_circuits.resources import toy_model_path
from modality_circuits.sweeps.executors import LocalExecutor, ModelSpec, RayExecutor, SlurmExecutor, make_executor
from modality_circuits.sweeps.knockout import knockout_sweep
from modality_circuits.sweeps.units import LOG
from modality_circuits.testing import DiesOnce, SlowCalls

EDGES = [("image", "last"), ("instruction", "last"), ("random0~instruction", "last")]
KW = dict(edges=EDGES, centers=[1, 4], batch_size=3, progress=False, seed=2)
SPEC = ModelSpec(str(toy_model_path()), threads=1)


@pytest.fixture(scope="module")
def toy() -> HookedMLLM:
    return SPEC.load()


@pytest.fixture(scope="module")
def samples() -> list:
    return synthetic(12, seed=11, kind="conflict")  # 4 units of 3


@pytest.fixture(scope="module")
def whole(toy: HookedMLLM, samples: list) -> pd.DataFrame:
    return knockout_sweep(toy, samples, **KW)


def _log(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / LOG).read_text().splitlines()]


def test_spec_of_a_loaded_model_and_refusals(toy: HookedMLLM, circuit_model: HookedMLLM, samples: list) -> None:
    assert ModelSpec.of(toy, threads=1) == SPEC
    with pytest.raises(ModalityCircuitsError, match="has none"):
        ModelSpec.of(circuit_model)  # built in memory: no directory for workers to load
    with pytest.raises(ModalityCircuitsError, match="choose from local, ray, slurm"):
        make_executor("dask", SPEC)
    with pytest.raises(ModalityCircuitsError, match="give the sweep a units_dir"):
        knockout_sweep(toy, samples, executor=RayExecutor(SPEC, workers=2), **KW)
    assert isinstance(make_executor(None, None), LocalExecutor)


def test_ray_two_workers_equals_one_process_and_survives_a_killed_worker(
        toy: HookedMLLM, samples: list, whole: pd.DataFrame, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("ray")
    marker, d = tmp_path / "killed-once", tmp_path / "units"
    # the sweep's unit function, except that the first worker process to run a unit dies (os._exit)
    monkeypatch.setattr("modality_circuits.sweeps.knockout.knockout_rows",
                        DiesOnce("modality_circuits.sweeps.knockout:knockout_rows", str(marker)))
    got = knockout_sweep(toy, samples, units_dir=d, executor=RayExecutor(SPEC, workers=2), retries=1, **KW)
    assert marker.exists()  # a worker really died
    pd.testing.assert_frame_equal(got, whole)
    assert not got.duplicated(["sample_id", "edge", "layer"]).any()
    log = _log(d)
    lost = [r for r in log if r["status"] == "failed"]
    assert len(lost) == 1 and lost[0]["error"].startswith("worker lost")
    done = [r for r in log if r["status"] == "done"]
    assert sorted(r["unit"] for r in done) == [f"unit-0000{i}" for i in range(4)]
    assert len({r["pid"] for r in done}) >= 2 and os.getpid() not in {r["pid"] for r in done}


def test_ray_driver_interrupted_then_resumed(toy: HookedMLLM, samples: list, whole: pd.DataFrame, tmp_path: Path,
                                            monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    from modality_circuits.sweeps.units import UnitStore

    d, real, writes = tmp_path / "units", UnitStore.write, []

    def interrupted_on_second(self, unit, df):  # noqa: ANN001, ANN202
        writes.append(unit.name)
        if len(writes) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the driver while the workers compute
        real(self, unit, df)

    monkeypatch.setattr(UnitStore, "write", interrupted_on_second)
    was_running = ray.is_initialized()
    ex = RayExecutor(SPEC, workers=2)
    with pytest.raises(KeyboardInterrupt):
        knockout_sweep(toy, samples, units_dir=d, executor=ex, **KW)
    assert not ex._actors and ray.is_initialized() == was_running  # no actor, nor an instance it started, is left
    monkeypatch.setattr(UnitStore, "write", real)
    assert len(list(d.glob("unit-*.parquet"))) == 1 and not list(d.glob(".*"))
    got = knockout_sweep(toy, samples, units_dir=d, executor=RayExecutor(SPEC, workers=2), **KW)
    pd.testing.assert_frame_equal(got, whole)
    done = [r["unit"] for r in _log(d) if r["status"] == "done"]
    assert sorted(done) == [f"unit-0000{i}" for i in range(4)]  # the first unit was not run again


def test_submitit_local_array_equals_one_process(toy: HookedMLLM, samples: list, whole: pd.DataFrame,
                                                 tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    d = tmp_path / "units"
    # stopped after one unit (one shard of four), then finished by a 2-job array
    assert knockout_sweep(toy, samples, units_dir=d, shard=(0, 4), **KW) is None
    slurm = SlurmExecutor(SPEC, workers=2, cluster="local", poll_s=0.5, parameters={"timeout_min": 10})
    got = knockout_sweep(toy, samples, units_dir=d, executor=slurm, **KW)
    pd.testing.assert_frame_equal(got, whole)
    done = [r for r in _log(d) if r["status"] == "done"]
    assert sorted(r["unit"] for r in done) == [f"unit-0000{i}" for i in range(4)]  # each unit exactly once
    assert {r["shard"] for r in done} == {"0/4", "0/2", "1/2"}
    assert (d / "slurm").is_dir()
    with pytest.raises(ModalityCircuitsError, match="drop --shard"):
        knockout_sweep(toy, samples, units_dir=tmp_path / "u2", executor=slurm, shard=(0, 2), **KW)


def test_a_preempted_slurm_job_is_requeued_and_finishes_the_units(toy: HookedMLLM, samples: list,
                                                                  whole: pd.DataFrame, tmp_path: Path,
                                                                  monkeypatch) -> None:
    submitit = pytest.importorskip("submitit")
    import time

    from modality_circuits.sweeps.units import UnitStore

    monkeypatch.setattr("modality_circuits.sweeps.knockout.knockout_rows",
                        SlowCalls("modality_circuits.sweeps.knockout:knockout_rows", 1.0))
    d = tmp_path / "units"
    slurm = SlurmExecutor(SPEC, workers=1, cluster="local", poll_s=0.2, wait=False, parameters={"timeout_min": 10})
    assert knockout_sweep(toy, samples, units_dir=d, executor=slurm, **KW) is None  # submitted, not waited for
    store = UnitStore.open(d)
    (job,) = slurm.last_jobs
    slurm.last_jobs.clear()  # submitit's job objects must not outlive the test (their __del__ at exit is noisy)
    deadline = time.time() + 120
    while len(store.missing()) > 3 and time.time() < deadline:  # the first unit is on disk
        time.sleep(0.2)
    # pre-emption as Slurm signals it, to the job's task process: submitit calls checkpoint() and requeues the shard
    os.kill(_log(d)[0]["pid"], submitit.JobEnvironment._usr_sig())
    slurm.wait_for(store, [job], progress=False)
    pd.testing.assert_frame_equal(store.merge(), whole)
    done = [r for r in _log(d) if r["status"] == "done"]
    assert sorted(r["unit"] for r in done) == [f"unit-0000{i}" for i in range(4)]  # none run twice
    assert len({r["pid"] for r in done}) == 2  # the requeued process finished the rest
    del job
