"""Resumable, shardable sweeps: a sweep as a list of independent work units, one result file per unit.

A **work unit** is one slice of the samples (``per_unit`` of them, in order; one forward batch) × all of the sweep's
configurations. Its result, a tidy table, is written atomically to ``<root>/<name>.parquet`` (pyarrow: the column
types survive the round trip; :func:`~modality_circuits.rundir.atomic_write_with`), so a unit is either wholly on
disk or not at all.
:func:`run_units` runs the units that have no file yet (a rerun after a crash or a pre-emption skips the finished
ones, and never duplicates a row), optionally only shard ``i`` of ``N`` (units ``i, i + N, …``: one task of a
Slurm job array, one worker), retrying a failed unit a bounded number of times and then raising an error that names
it. Every attempt is one line of ``log.jsonl`` (unit, status, seconds, shard, host, pid, error);
:meth:`UnitStore.progress` gives units done / total and the remaining work's estimated time.
:meth:`UnitStore.merge` combines the units in plan order once all are there.

``plan.json`` records the plan: the sweep's parameters and every unit's sample ids. A rerun with another plan (other
samples, edges, layers, seed …) refuses instead of mixing results; the same sweep rerun with another batch size
keeps the plan on disk. Units are independent of each other and of how
the samples are batched (random control sets are seeded per sample id), so a sharded run merges to the same table
as a single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..errors import ModalityCircuitsError
from ..rundir import atomic_write_text, atomic_write_with

logger = logging.getLogger(__name__)

PLAN = "plan.json"
#: One JSON line per attempt of a unit (unit, status, seconds, attempt, shard, host, pid, error): the per-unit log.
LOG = "log.jsonl"


@dataclass(frozen=True)
class WorkUnit:
    """One independent piece of a sweep: ``sample_ids`` × all configurations; results in ``<name>.parquet``."""

    index: int
    sample_ids: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"unit-{self.index:05d}"


def plan_units(sample_ids: Sequence[str], per_unit: int) -> list[WorkUnit]:
    """Consecutive slices of ``per_unit`` sample ids (the last may be shorter)."""
    if per_unit < 1:
        raise ModalityCircuitsError(f"Work units need at least one sample each; got per_unit={per_unit}.")
    ids = [str(s) for s in sample_ids]
    if len(set(ids)) != len(ids):
        raise ModalityCircuitsError("Work units are keyed by sample id, and the sample ids are not unique.")
    return [WorkUnit(k, tuple(ids[i:i + per_unit])) for k, i in enumerate(range(0, len(ids), per_unit))]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N`` (None: ``(0, 1)``, everything)."""
    if text in (None, ""):
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ModalityCircuitsError(f"--shard: cannot parse {text!r}; use I/N, e.g. 0/4 … 3/4.") from None
    if not 0 <= i < n:
        raise ModalityCircuitsError(f"--shard {text}: need 0 <= I < N (shards are numbered from 0).")
    return i, n


class UnitStore:
    """The unit files of one sweep under ``root`` and its ``plan.json`` (checked against ``params`` and units)."""

    def __init__(self, root: str | Path, units: Sequence[WorkUnit], params: dict[str, Any]):
        self.root, self.units, self.params = Path(root), list(units), params
        plan = {"params": json.loads(json.dumps(params, default=str)),
                "units": {u.name: list(u.sample_ids) for u in self.units}}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / PLAN
        if path.exists():
            old = json.loads(path.read_text())
            old_units = [WorkUnit(k, tuple(ids)) for k, ids in enumerate(old.get("units", {}).values())]
            if old.get("params") == plan["params"] and [i for u in old_units for i in u.sample_ids] == [
                    i for u in self.units for i in u.sample_ids]:
                self.units = old_units  # the same sweep planned with another batch size: keep the plan on disk
                plan = old
            if old != plan:
                what = "parameters" if old.get("params") != plan["params"] else "samples or unit sizes"
                raise ModalityCircuitsError(
                    f"{self.root} holds the units of another sweep (its {what} differ; see {path}). Use another "
                    "directory, or delete this one to start again.")
        else:
            atomic_write_text(path, json.dumps(plan, indent=1))

    @classmethod
    def open(cls, root: str | Path) -> UnitStore:
        """The store of an existing ``root`` (its units and parameters read from ``plan.json``)."""
        path = Path(root) / PLAN
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModalityCircuitsError(f"{path} is missing or unreadable ({e}); it is written when a sweep's "
                                        "first work unit starts.") from None
        return cls(root, [WorkUnit(k, tuple(ids)) for k, ids in enumerate(plan["units"].values())], plan["params"])

    def path(self, unit: WorkUnit) -> Path:
        return self.root / f"{unit.name}.parquet"

    def done(self, unit: WorkUnit) -> bool:
        return self.path(unit).is_file()

    def missing(self) -> list[str]:
        return [u.name for u in self.units if not self.done(u)]

    def write(self, unit: WorkUnit, df: pd.DataFrame) -> None:
        atomic_write_with(self.path(unit), lambda p: df.to_parquet(p, index=False))

    def log(self, unit: WorkUnit, status: str, seconds: float, attempt: int, shard: tuple[int, int],
            error: str | None = None, host: str | None = None, pid: int | None = None) -> None:
        """Append one line to ``log.jsonl``: unit, status, seconds, attempt, shard, host and pid (and the error).
        Each line is one small append, so the parts of a sharded run can share the file. ``host``/``pid``: the
        worker that computed the unit (default: this process)."""
        rec = {"unit": unit.name, "status": status, "seconds": round(seconds, 3), "attempt": attempt,
               "shard": f"{shard[0]}/{shard[1]}", "host": host or socket.gethostname(), "pid": pid or os.getpid(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if error:
            rec["error"] = error[:500]
        with open(self.root / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def progress(self) -> dict[str, Any]:
        """``{"done", "total", "eta_s"}`` over all shards: the units on disk, and ``eta_s``, the remaining units
        times the mean seconds of a finished one in ``log.jsonl`` (None before any finished). That is one worker's
        time: divide by the number of parallel workers for the wall time."""
        done = len(self.units) - len(self.missing())
        secs = []
        if (self.root / LOG).is_file():
            for line in (self.root / LOG).read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if r.get("status") == "done":
                    secs.append(float(r["seconds"]))
        left = len(self.units) - done
        return {"done": done, "total": len(self.units),
                "eta_s": round(left * sum(secs) / len(secs), 3) if secs else None}

    def merge(self) -> pd.DataFrame:
        """All units' rows in plan order.

        Raises:
            ModalityCircuitsError: units are missing (named).
        """
        missing = self.missing()
        if missing:
            raise ModalityCircuitsError(f"{len(missing)} of {len(self.units)} work units in {self.root} are not "
                                        f"done yet: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}. "
                                        "Run the remaining shards (or rerun without --shard) first.")
        return pd.concat([pd.read_parquet(self.path(u)) for u in self.units], ignore_index=True)


def run_units(store: UnitStore, work: Callable[[WorkUnit], pd.DataFrame], shard: tuple[int, int] = (0, 1),
              retries: int = 1, progress: bool = True, desc: str = "work units") -> dict[str, Any]:
    """Run shard ``shard = (i, N)`` of ``store``'s units that are not on disk yet; ``work(unit)`` -> its table.

    A unit that raises is retried up to ``retries`` more times; if it still fails, the others of the shard are
    still run and then an error names every failed unit (their files are absent, so a rerun retries them).

    Returns:
        ``{"ran": [names], "skipped": [names already done], "seconds": float}``.
    """
    i, n = shard
    mine = [u for u in store.units if u.index % n == i]
    todo = [u for u in mine if not store.done(u)]
    skipped = [u.name for u in mine if store.done(u)]
    if skipped:
        logger.info("%s: %d of %d unit(s) of shard %d/%d already done, skipped", desc, len(skipped), len(mine), i, n)
    t0, ran, failed = time.time(), [], {}
    for unit in tqdm(todo, desc=f"{desc} (shard {i}/{n})" if n > 1 else desc, disable=not progress):
        error = None
        for attempt in range(retries + 1):
            t = time.time()
            try:
                store.write(unit, work(unit))
                store.log(unit, "done", time.time() - t, attempt, shard)
                error = None
                break
            except (KeyboardInterrupt, ModalityCircuitsError) as e:
                store.log(unit, "interrupted" if isinstance(e, KeyboardInterrupt) else "error", time.time() - t,
                          attempt, shard, f"{type(e).__name__}: {e}")
                raise  # an interrupt stops the run; a bad input fails every attempt the same way
            except Exception as e:  # a transient failure (out of memory, a lost device): retry, then report
                logger.warning("%s: %s failed (attempt %d of %d): %s", desc, unit.name, attempt + 1, retries + 1, e)
                error = f"{type(e).__name__}: {e}"
                store.log(unit, "failed", time.time() - t, attempt, shard, error)
        if error is None:
            ran.append(unit.name)
        else:
            failed[unit.name] = error
    if failed:
        raise ModalityCircuitsError(
            f"{len(failed)} work unit(s) failed after {retries + 1} attempt(s) each: "
            + "; ".join(f"{k} ({v})" for k, v in list(failed.items())[:5])
            + f". The {len(ran)} other unit(s) are saved; rerun the same command to retry the failed ones.")
    return {"ran": ran, "skipped": skipped, "seconds": round(time.time() - t0, 2)}


@dataclass(frozen=True)
class UnitTask:
    """What computes any unit of one sweep, picklable (it travels to Ray workers and Slurm jobs):
    ``fn(model, samples, **kwargs) -> DataFrame``, a module-level function (pickled by reference), its keyword
    arguments (interventions, metrics, baselines: frozen dataclasses and tensors) and the sweep's samples by id."""

    fn: Callable[..., pd.DataFrame]
    kwargs: dict[str, Any]
    samples: dict[str, Any]

    def __call__(self, model: Any, unit: WorkUnit) -> pd.DataFrame:
        return self.fn(model, [self.samples[i] for i in unit.sample_ids], **self.kwargs)


def sweep_in_units(model: Any, samples: Sequence[Any], fn: Callable[..., pd.DataFrame], kwargs: dict[str, Any],
                   params: dict[str, Any], units_dir: str | Path | None, per_unit: int,
                   shard: tuple[int, int] | None = None, retries: int = 1, progress: bool = True,
                   desc: str = "work units", executor: Any = None) -> pd.DataFrame | None:
    """The one driver every sweep shares: ``fn(model, samples, **kwargs)`` over all ``samples``.

    Without ``units_dir`` (and with the local executor): in this process, ``per_unit`` samples at a time, rows
    concatenated. With ``units_dir``: as work units of ``per_unit`` samples (their rows in one Parquet file each,
    ``params`` recorded in ``plan.json``), run by ``executor`` (:mod:`modality_circuits.sweeps.executors`:
    ``"local"``/None in this process, or a Ray or Slurm executor whose workers load their own model replica).

    Returns:
        The rows of every sample, in sample order; with ``units_dir``, None while units of other shards (or jobs
        not waited for) are missing.
    """
    from .executors import as_executor

    ex = as_executor(executor)
    task = UnitTask(fn, kwargs, {str(s.id): s for s in samples})
    if not samples:
        return pd.DataFrame()
    if units_dir is None:
        if ex.name != "local":
            raise ModalityCircuitsError(f"The {ex.name} executor writes each work unit's rows to a file: give the "
                                        "sweep a units_dir (the CLI uses <run>/units/<sweep>).")
        chunks = [list(samples[i:i + per_unit]) for i in range(0, len(samples), per_unit)]
        parts = [fn(model, c, **kwargs) for c in tqdm(chunks, desc=desc, disable=not progress or len(chunks) < 2)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    store = UnitStore(units_dir, plan_units([s.id for s in samples], per_unit), params)
    ex.run(store, task, model, shard or (0, 1), retries, progress, desc)
    return None if store.missing() else store.merge()


__all__ = ["LOG", "PLAN", "UnitStore", "UnitTask", "WorkUnit", "parse_shard", "plan_units", "run_units",
           "sweep_in_units"]
