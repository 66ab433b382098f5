"""Run directories: atomic files, one configuration per directory, refusals that change nothing, resume state."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from modality_circuits.errors import ModalityCircuitsError
from modality_circuits.rundir import (
    atomic_write_text,
    claim_run_dir,
    config_diff,
    finished_stages,
    new_run_dir,
    point_latest,
    run_config,
)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def write_run(d: Path, config: dict, stages: dict | None = None, finished: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    m = {"command": config["command"], "config": config, "stages": stages or {"load": {"status": "done"},
                                                                            "knockout": {"status": "done"}}}
    if finished:
        m["finished"] = "2026-12-03T00:00:00"
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "knockout.csv").write_text("a,b\n1,2\n")


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "results.json"
    atomic_write_text(f, "old")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(f, "new " * 1000)
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temporary file is gone
    monkeypatch.undo()
    atomic_write_text(f, "new")
    assert f.read_text() == "new"


def test_runtime_options_do_not_change_the_configuration() -> None:
    a = run_config("knockout", {"n": 40, "seed": 0, "threads": 2, "device": "cpu", "out": "x", "quiet": False})
    b = run_config("knockout", {"n": 40, "seed": 0, "threads": 1, "device": "cuda", "out": "y", "quiet": True})
    assert a == b == {"command": "knockout", "n": 40, "seed": 0}
    assert config_diff(a, {**a, "seed": 1}) == ["seed: 0 -> 1"]


def test_refusals_change_nothing(tmp_path: Path) -> None:
    cfg = run_config("knockout", {"n": 40, "seed": 0})
    d = tmp_path / "run"
    write_run(d, cfg)
    before = snapshot(d)
    with pytest.raises(ModalityCircuitsError, match=r"another configuration \(seed: 0 -> 1\).*--overwrite"):
        claim_run_dir(d, {**cfg, "seed": 1})
    with pytest.raises(ModalityCircuitsError, match="already holds a finished run of this configuration.*--resume"):
        claim_run_dir(d, cfg)
    assert snapshot(d) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    for overwrite in (False, True):  # never deletes a folder that is not a run directory
        with pytest.raises(ModalityCircuitsError, match="not a modality-circuits run directory"):
            claim_run_dir(other, cfg, overwrite=overwrite)
    assert (other / "mine.txt").read_text() == "keep me"
    with pytest.raises(ModalityCircuitsError, match="is a file"):
        claim_run_dir(other / "mine.txt", cfg)


def test_resume_overwrite_and_runs_that_finished_nothing(tmp_path: Path) -> None:
    cfg = run_config("reproduce", {"n": 40})
    d = tmp_path / "run"
    write_run(d, cfg, finished=False)
    old = claim_run_dir(d, cfg, resume=True)
    assert old is not None and finished_stages(old) == ["knockout"] and (d / "knockout.csv").exists()
    assert claim_run_dir(d, {**cfg, "n": 12}, overwrite=True) is None
    assert list(d.iterdir()) == []
    write_run(d, cfg, stages={"load": {"status": "done"}, "mfr": {"status": "failed", "error": "x"}}, finished=False)
    assert claim_run_dir(d, {**cfg, "n": 12}) is None and list(d.iterdir()) == []  # nothing to lose


def test_default_directories_are_unique_with_a_latest_link(tmp_path: Path) -> None:
    a = new_run_dir(tmp_path, "knockout")
    a.mkdir(parents=True)
    b = new_run_dir(tmp_path, "knockout")
    assert a != b and a.parent == b.parent == tmp_path / "knockout"
    b.mkdir()
    point_latest(a)
    point_latest(b)
    latest = tmp_path / "knockout" / "latest"
    assert latest.is_symlink() and latest.resolve() == b.resolve() and os.readlink(latest) == b.name
