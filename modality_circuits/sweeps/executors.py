"""Where a sweep's work units run: in this process, on Ray, or as a Slurm job array (submitit).

Every executor runs the units of one :class:`~modality_circuits.sweeps.units.UnitStore` that have no file yet and
leaves each finished unit's rows on disk, so any of them can be stopped and resumed by another (a Ray run finished
by a Slurm array, say) with the same merged table. The three differ only in where the model lives:

* :class:`LocalExecutor` (``"local"``, the default): the caller's model, in this process
  (:func:`~modality_circuits.sweeps.units.run_units`).
* :class:`RayExecutor` (``pip install .[ray]``): one actor per worker (a GPU, ``gpus_per_worker=1``, or
  ``cpus_per_worker`` CPU slots) holding its own model replica, loaded once from a :class:`ModelSpec`; units are
  tasks handed to idle actors. On a laptop it starts a local Ray instance; ``address`` (or ``RAY_ADDRESS``) joins an
  existing cluster. Results come back to the driver, which writes the unit files, so workers need no shared disk.
  A worker that dies (killed, out of memory, a lost node) is replaced and its unit retried, ``retries`` times at
  most; a unit that keeps failing is named in the error, never dropped.
* :class:`SlurmExecutor` (``pip install .[slurm]``): a submitit job array of ``workers`` jobs, job ``i`` running
  shard ``i/N`` of the units with its own replica. Jobs are checkpointable: on pre-emption or time-out submitit
  requeues them, and the requeued job skips the units already on disk. Needs a disk shared with the jobs.
  ``cluster="local"`` runs the same array as local processes (submitit's local executor, used by the tests).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from ..errors import ModalityCircuitsError
from .units import UnitStore, UnitTask, WorkUnit, run_units

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray", "slurm")
_LOADED: dict[ModelSpec, Any] = {}  # one replica per worker process


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads its own replica: a local checkpoint directory, dtype name, device and torch threads."""

    path: str
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def of(cls, model: HookedMLLM, **overrides: Any) -> ModelSpec:
        """The spec of a model loaded with :meth:`HookedMLLM.from_pretrained` (its ``source`` directory)."""
        src = getattr(model, "source", "<in-memory>")
        if not src or src.startswith("<") or not Path(src).is_dir():
            raise ModalityCircuitsError(
                f"Workers load their own model copy from a checkpoint directory, and this model has none (source "
                f"{src!r}). Save it (HF save_pretrained) and load it with HookedMLLM.from_pretrained, or pass a "
                "ModelSpec(path=...) to the executor.")
        dtype = str(model.cfg.dtype).removeprefix("torch.")
        return cls(**{"path": src, "dtype": dtype, **overrides})

    def load(self) -> HookedMLLM:
        """The replica of this process (loaded on first use, then reused for every unit)."""
        if self not in _LOADED:
            import torch

            from ..models.hooked_mllm import HookedMLLM

            if self.threads:
                torch.set_num_threads(self.threads)
            t = time.time()
            _LOADED[self] = HookedMLLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype), device=self.device)
            logger.info("worker %s:%d loaded %s in %.1f s", socket.gethostname(), os.getpid(), self.path,
                        time.time() - t)
        return _LOADED[self]


class Executor(Protocol):
    name: str

    def run(self, store: UnitStore, task: UnitTask, model: Any, shard: tuple[int, int], retries: int,
            progress: bool, desc: str) -> dict[str, Any]:
        """Run shard ``shard`` of ``store``'s missing units; ``model`` is the caller's (used by local only)."""
        ...


@dataclass
class LocalExecutor:
    """The units in this process with the caller's model (or ``model`` loaded here when the caller has none)."""

    model: ModelSpec | None = None
    name: str = field(default="local", init=False)

    def run(self, store: UnitStore, task: UnitTask, model: Any, shard: tuple[int, int], retries: int,
            progress: bool, desc: str) -> dict[str, Any]:
        m = model if model is not None else (self.model.load() if self.model else None)
        if m is None:
            raise ModalityCircuitsError("The local executor needs a model or a ModelSpec.")
        return run_units(store, lambda u: task(m, u), shard, retries, progress, desc)


class _RayWorker:
    """One model replica, kept across sweeps; runs units and sends their rows back (the driver writes them)."""

    def __init__(self, spec: ModelSpec):
        self.model, self.key, self.task = spec.load(), None, None

    def run(self, key: str, task_box: list, unit: WorkUnit) -> tuple[Any, float, str, int]:
        """``task_box``: ``[ObjectRef]`` of the sweep's :class:`UnitTask` (fetched once per sweep, by ``key``)."""
        if key != self.key:
            import ray

            self.task, self.key = ray.get(task_box[0]), key
        t = time.time()
        return self.task(self.model, unit), time.time() - t, socket.gethostname(), os.getpid()


def _cause(err: BaseException) -> BaseException:
    """The worker's own exception inside a Ray task error (the error itself where there is none)."""
    return getattr(err, "cause", None) or err


@dataclass
class RayExecutor:
    """Work units as Ray tasks on ``workers`` actors, each holding one replica of ``model``.

    Args:
        model: what each actor loads (:class:`ModelSpec`; on GPUs use ``device="cuda"``: Ray gives each actor its
            own device).
        workers: number of actors (default: one per GPU when ``gpus_per_worker > 0``, else the cluster's CPUs
            divided by ``cpus_per_worker``).
        address: an existing cluster (default ``RAY_ADDRESS``; neither: a local instance).
        keep_alive: keep the actors (and their loaded replicas) for the next sweep run by this executor, until
            :meth:`close` (or the end of a ``with`` block, or of the process); False: close after every sweep.
    """

    model: ModelSpec
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None
    keep_alive: bool = False
    name: str = field(default="ray", init=False)
    _actors: list = field(default_factory=list, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    def _n_workers(self, ray: Any) -> int:
        if self.workers:
            return self.workers
        res = ray.cluster_resources()
        if self.gpus_per_worker > 0:
            return max(1, int(res.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(res.get("CPU", 1) // self.cpus_per_worker))

    def _start(self, ray: Any) -> None:
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None and self.workers:
                kw["num_cpus"] = max(int(os.cpu_count() or 1), int(self.workers * self.cpus_per_worker + 0.999))
            ray.init(address=address, **kw)
            self._started = True

    def close(self) -> None:
        """Stop the actors (and the local Ray instance this executor started)."""
        if self._actors or self._started:
            import ray

            for a in self._actors:
                ray.kill(a, no_restart=True)
            self._actors = []
            if self._started:
                ray.shutdown()
                self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, store: UnitStore, task: UnitTask, model: Any, shard: tuple[int, int], retries: int,
            progress: bool, desc: str) -> dict[str, Any]:
        ray = _import("ray", "ray")
        from ray.exceptions import RayActorError, RayTaskError

        i, n = shard
        mine = [u for u in store.units if u.index % n == i]
        todo = deque(u for u in mine if not store.done(u))
        skipped = [u.name for u in mine if store.done(u)]
        running: dict[Any, tuple[int, WorkUnit, int, float]] = {}  # ref -> (actor slot, unit, attempt, start)
        attempts: dict[str, int] = {}
        ran: list[str] = []
        failed: dict[str, str] = {}
        t0 = time.time()
        if not todo:
            return {"ran": ran, "skipped": skipped, "seconds": 0.0}
        self._start(ray)
        Worker = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)(_RayWorker)
        while len(self._actors) < self._n_workers(ray):  # replicas persist across the sweeps of one executor
            self._actors.append(Worker.remote(self.model))
        key, box = f"{store.root}:{time.time()}", [ray.put(task)]
        try:
            idle = deque(range(min(len(self._actors), len(todo))))
            bar = tqdm(total=len(todo), desc=f"{desc} (ray, {len(idle)} workers)", disable=not progress)
            while todo or running:
                while todo and idle:
                    slot, unit = idle.popleft(), todo.popleft()
                    ref = self._actors[slot].run.remote(key, box, unit)
                    running[ref] = (slot, unit, attempts.get(unit.name, 0), time.time())
                [ref], _ = ray.wait(list(running), num_returns=1)
                slot, unit, attempt, start = running.pop(ref)
                try:
                    df, secs, host, pid = ray.get(ref)
                except (RayActorError, RayTaskError) as e:
                    err, lost = _cause(e), isinstance(e, RayActorError)
                    msg = ("worker lost: " if lost else "") + f"{type(err).__name__}: {err}"
                    if isinstance(err, ModalityCircuitsError):  # bad input fails every attempt the same way
                        store.log(unit, "error", time.time() - start, attempt, shard, msg)
                        raise err from None
                    store.log(unit, "failed", time.time() - start, attempt, shard, msg)
                    logger.warning("%s: %s failed on a Ray worker (attempt %d of %d): %s", desc, unit.name,
                                   attempt + 1, retries + 1, msg.splitlines()[0])
                    if lost:  # replace the dead actor (a fresh replica)
                        ray.kill(self._actors[slot], no_restart=True)
                        self._actors[slot] = Worker.remote(self.model)
                    attempts[unit.name] = attempt + 1
                    if attempt < retries:
                        todo.appendleft(unit)
                    else:
                        failed[unit.name] = msg.splitlines()[0]
                        bar.update(1)
                    idle.append(slot)
                    continue
                store.write(unit, df)
                store.log(unit, "done", secs, attempt, shard, host=host, pid=pid)
                ran.append(unit.name)
                bar.update(1)
                idle.append(slot)
            bar.close()
        except BaseException:
            self.close()  # an interrupt or an error: no actor left behind
            raise
        if not self.keep_alive:
            self.close()
        if failed:
            raise ModalityCircuitsError(
                f"{len(failed)} work unit(s) failed after {retries + 1} attempt(s) each: "
                + "; ".join(f"{k} ({v})" for k, v in list(failed.items())[:5])
                + f". The {len(ran)} other unit(s) are saved; rerun the same command to retry the failed ones.")
        return {"ran": ran, "skipped": skipped, "seconds": round(time.time() - t0, 2)}


class _SlurmShard:
    """One job of the array: shard ``i/n`` of the units under ``root`` with its own replica. Checkpointable: on
    pre-emption submitit requeues the same call, which skips the units already on disk."""

    def __init__(self, spec: ModelSpec, task: UnitTask, root: str, retries: int, desc: str):
        self.spec, self.task, self.root, self.retries, self.desc = spec, task, root, retries, desc

    def __call__(self, i: int, n: int) -> dict[str, Any]:
        model = self.spec.load()
        store = UnitStore.open(self.root)
        return run_units(store, lambda u: self.task(model, u), (i, n), self.retries, False, self.desc)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


@dataclass
class SlurmExecutor:
    """Work units as a submitit job array: ``workers`` jobs, job ``i`` runs shard ``i/workers``.

    Args:
        model: what each job loads (:class:`ModelSpec`).
        parameters: submitit's ``update_parameters`` (``timeout_min``, ``slurm_partition``, ``gpus_per_node``,
            ``cpus_per_task``, ``mem_gb``, ``slurm_additional_parameters`` …).
        cluster: None (Slurm where ``sbatch`` exists), ``"slurm"``, ``"local"`` (local processes) or ``"debug"``.
        folder: submitit's logs and pickles (default ``<units>/slurm``).
        wait: wait for the array (progress over all jobs); False returns after submitting (``merge`` later).
    """

    model: ModelSpec
    workers: int = 4
    parameters: dict[str, Any] = field(default_factory=dict)
    cluster: str | None = None
    folder: str | None = None
    wait: bool = True
    poll_s: float = 5.0
    name: str = field(default="slurm", init=False)
    last_jobs: list = field(default_factory=list, init=False, repr=False)  # jobs of the last run(wait=False)

    def run(self, store: UnitStore, task: UnitTask, model: Any, shard: tuple[int, int], retries: int,
            progress: bool, desc: str) -> dict[str, Any]:
        if shard != (0, 1):
            raise ModalityCircuitsError("--shard and the slurm executor both split the units: the executor submits "
                                        "one job per shard itself; drop --shard.")
        if not store.missing():
            return {"ran": [], "skipped": [u.name for u in store.units], "seconds": 0.0, "jobs": []}
        t0 = time.time()
        jobs = self.submit(store, task, retries, desc)
        ids = [j.job_id for j in jobs]
        if self.wait:
            self.wait_for(store, jobs, progress, desc)
        else:
            self.last_jobs = jobs  # for wait_for() later
        return {"ran": [], "skipped": [], "seconds": round(time.time() - t0, 2), "jobs": ids}

    def submit(self, store: UnitStore, task: UnitTask, retries: int = 1, desc: str = "work units") -> list[Any]:
        """Submit the array (``min(workers, missing units)`` jobs); returns submitit's jobs."""
        submitit = _import("submitit", "slurm")
        folder = self._folder(store)
        ex = submitit.AutoExecutor(folder=folder / "%j", cluster=self.cluster)
        n = max(1, min(self.workers, len(store.missing())))
        ex.update_parameters(name=f"mc-{desc.split()[0]}", slurm_array_parallelism=n, **self.parameters)
        jobs = ex.map_array(_SlurmShard(self.model, task, str(store.root), retries, desc), list(range(n)), [n] * n)
        logger.info("%s: submitted %d job(s) %s; logs in %s", desc, n, ", ".join(str(j.job_id) for j in jobs), folder)
        return jobs

    def wait_for(self, store: UnitStore, jobs: list[Any], progress: bool = True, desc: str = "work units") -> None:
        """Wait for ``jobs`` (requeued ones included), showing units done over all of them; an error names the
        jobs that failed."""
        total = len(store.units)
        bar = tqdm(total=total, initial=total - len(store.missing()), desc=f"{desc} (slurm, {len(jobs)} jobs)",
                   disable=not progress)
        while not all(j.done() for j in jobs):
            time.sleep(self.poll_s)
            bar.update(total - len(store.missing()) - bar.n)
        bar.update(total - len(store.missing()) - bar.n)
        bar.close()
        errors = []
        for j in jobs:
            try:
                j.result()
            except Exception as e:  # a job's own error, with its log's tail: name it, keep the others' units
                errors.append(f"job {j.job_id}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}")
        if errors:
            raise ModalityCircuitsError(
                f"{len(errors)} of {len(jobs)} Slurm job(s) failed: " + "; ".join(errors[:4]) + f". Logs: "
                f"{self._folder(store)}. The finished units are saved ({total - len(store.missing())} of {total}); "
                "rerun to retry the rest.")

    def _folder(self, store: UnitStore) -> Path:
        return Path(self.folder or store.root / "slurm")


def _import(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModalityCircuitsError(f"The {extra} executor needs the optional package {module!r}: "
                                    f"pip install 'modality_circuits[{extra}]' (pinned), or use --executor local."
                                    ) from None


def as_executor(executor: Any) -> Any:
    """None or ``"local"`` -> :class:`LocalExecutor`; an executor object as it is."""
    if executor is None or executor == "local":
        return LocalExecutor()
    if isinstance(executor, str):
        raise ModalityCircuitsError(f"Executor {executor!r}: build RayExecutor(ModelSpec(...)) or "
                                    "SlurmExecutor(ModelSpec(...)) (the CLI does it from --executor), or use 'local'.")
    if not hasattr(executor, "run"):
        raise ModalityCircuitsError(f"{executor!r} is not an executor (it has no run method).")
    return executor


def make_executor(name: str | None, spec: ModelSpec | None, workers: int | None = None, **options: Any) -> Any:
    """The executor named ``name`` (``local``, ``ray`` or ``slurm``) for workers loading ``spec``."""
    name = name or "local"
    if name not in EXECUTORS:
        raise ModalityCircuitsError(f"--executor {name!r}: choose from {', '.join(EXECUTORS)}.")
    if name == "local":
        return LocalExecutor()
    if spec is None:
        raise ModalityCircuitsError(f"The {name} executor needs a model checkpoint directory for its workers.")
    if name == "ray":
        return RayExecutor(spec, workers=workers, **options)
    return SlurmExecutor(spec, workers=workers or 4, **options)


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "ModelSpec", "RayExecutor", "SlurmExecutor", "as_executor",
           "make_executor"]
