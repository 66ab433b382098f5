"""Run directories that lose nothing: one configuration per directory, atomic files, stage status, resume.

A run directory belongs to one configuration (:func:`run_config`: the command and every option that changes the
results; runtime options such as ``--threads``, ``--device`` or ``--batch-size`` are left out), recorded in its
``manifest.json`` under ``"config"``. :func:`claim_run_dir` decides whether a new run may write into a directory
(refusals raise :class:`~modality_circuits.errors.ModalityCircuitsError`):

* missing or empty: a fresh run;
* a file, or not writable: refused;
* not empty without a readable ``manifest.json``: refused, it is not a run directory (even with ``--overwrite``);
* a run of another configuration: refused, naming the options that differ, unless ``--overwrite`` or unless it
  finished no stage (it failed while loading, or on a bad option: there is nothing to lose, it is replaced);
* a run of the same configuration: refused unless ``--resume`` (continue it), ``--shard`` (another part of it) or
  ``--overwrite``; one that finished no stage is simply continued.

Refusals change nothing. ``--overwrite`` empties the run directory first; ``--resume`` keeps the finished stages
(their status is ``"done"`` in ``manifest["stages"]``) and reruns the rest. Every file is written atomically
(:func:`atomic_write_text`: a temporary file in the same directory, then ``os.replace``), so a full disk or a kill
never leaves a half-written file under a final name. Default directories are unique per run
(:func:`new_run_dir`: ``runs/<command>/<timestamp>``) with a ``latest`` symlink next to them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import ModalityCircuitsError

logger = logging.getLogger(__name__)

#: Options that do not change a run's results (or only by floating-point noise): they may differ on ``--resume``.
RUNTIME_OPTIONS = frozenset({"out", "quiet", "threads", "device", "batch_size", "overwrite", "resume", "no_png",
                             "shard", "func", "executor", "workers", "gpus_per_worker", "cpus_per_worker",
                             "slurm_partition", "slurm_time", "slurm_cluster"})


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``: readers see
    the old file or the whole new one, never a part. On any error the temporary file is removed and the old file
    (if any) is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_with(path: str | Path, write: Any) -> Path:
    """Like :func:`atomic_write_text` for any writer: ``write(tmp_path)`` fills a temporary file next to ``path``
    (e.g. ``lambda p: df.to_parquet(p)``), which then replaces ``path``; removed again on any error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def run_config(command: str, args: dict[str, Any]) -> dict[str, Any]:
    """The configuration a run directory belongs to: the command and its options minus :data:`RUNTIME_OPTIONS`."""
    return {"command": command, **{k: args[k] for k in sorted(args) if k not in RUNTIME_OPTIONS}}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["n: 40 -> 12", …]`` for every key whose value differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new), key=str)
            if old.get(k) != new.get(k)]


def read_manifest(d: str | Path) -> dict | None:
    """The directory's ``manifest.json``, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(d) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def finished_stages(manifest: dict) -> list[str]:
    """The stages a run finished, wholly or in part (``partial``: some work units of a sharded sweep), loading the
    model aside (manifests before stage status: its timed stages)."""
    if "stages" in manifest:
        return [k for k, v in manifest["stages"].items() if v.get("status") in ("done", "partial") and k != "load"]
    return [k for k in manifest.get("timings", {}) if k != "load"]


def new_run_dir(root: str | Path, command: str) -> Path:
    """A new, unique directory ``root/command/YYYYmmdd-HHMMSS[-k]`` (not created)."""
    base = Path(root) / command / time.strftime("%Y%m%d-%H%M%S")
    d, k = base, 1
    while d.exists():
        k += 1
        d = base.with_name(f"{base.name}-{k}")
    return d


def point_latest(d: Path) -> None:
    """Point ``d.parent/latest`` at ``d`` (a relative symlink, replaced atomically; skipped where symlinks fail)."""
    link = d.parent / "latest"
    tmp = d.parent / f".latest.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(d.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not point %s at %s: %s", link, d, e)


def claim_run_dir(out: Path, config: dict[str, Any], overwrite: bool = False, resume: bool = False) -> dict | None:
    """Check that ``out`` may take a run of ``config`` and prepare it (see the module's table).

    Returns:
        The earlier run's manifest when resuming it, else None (a fresh start; ``out`` exists and is empty).

    Raises:
        ModalityCircuitsError: the directory may not take this run; nothing was changed.
    """
    if out.exists() and not out.is_dir():
        raise ModalityCircuitsError(f"--out {out} is a file, not a directory; choose a directory path.")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):  # a temporary file is not a run
        old = read_manifest(out)
        if old is None:
            raise ModalityCircuitsError(
                f"--out {out} is not empty and has no readable manifest.json, so it is not a modality-circuits run "
                "directory; nothing was changed. Choose a new or empty directory.")
        old_config = old.get("config") or {"command": old.get("command")}
        if overwrite or (old_config != config and not finished_stages(old)):
            if overwrite:
                logger.warning("--overwrite: removing the earlier %s run in %s", old.get("command"), out)
            else:
                logger.info("replacing the run in %s: it finished no stage (nothing to lose)", out)
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            return None
        if old_config != config:
            diff = config_diff(old_config, config)
            raise ModalityCircuitsError(
                f"--out {out} holds a run of another configuration ({'; '.join(diff[:6])}"
                f"{'; …' if len(diff) > 6 else ''}); nothing was changed. Choose another --out, or pass --overwrite "
                "to replace that run.")
        if not resume and finished_stages(old):
            state = "a finished" if old.get("finished") else "an unfinished"
            raise ModalityCircuitsError(
                f"--out {out} already holds {state} run of this configuration; nothing was changed. Pass "
                "--resume to continue it (finished stages are kept), --overwrite to start again, or choose another "
                "--out.")
        return old
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ModalityCircuitsError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable "
                                    "directory.") from None
    return None


__all__ = ["RUNTIME_OPTIONS", "atomic_write_text", "atomic_write_with", "claim_run_dir", "config_diff",
           "finished_stages", "new_run_dir", "point_latest", "read_manifest", "run_config"]
