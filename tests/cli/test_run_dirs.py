"""Run directories from the command line: refuse / resume / overwrite with earlier results intact, unique default
directories, an interrupted run that the report flags and ``--resume`` completes, OS errors as clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from modality_circuits import cli
from modality_circuits.testing import tiny_toy_checkpoint

TINY = ["--n", "4", "--n-general", "2", "--n-failed-pool", "4", "--n-random", "2", "--alphas", "2",
        "--heatmap-methods", "attention", "--batch-size", "8", "--threads", "1", "--no-png", "--quiet"]
KO = ["--n", "4", "--edges", "image->last,instruction->last", "--variants", "none", "--random-sets", "0",
      "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_toy_checkpoint(tmp_path_factory.mktemp("tiny-toy")))


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_refuse_resume_overwrite(toy: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "run"
    assert run(["knockout", "--model", toy, "--out", str(d), *KO], capsys)[0] == 0
    before = snapshot(d)
    rc, _, err = run(["knockout", "--model", toy, "--out", str(d), *KO, "--seed", "1"], capsys)
    assert rc == 2 and "another configuration (seed: 0 -> 1)" in err and "nothing was changed" in err
    rc, _, err = run(["contributions", "--model", toy, "--out", str(d), "--n", "4", "--quiet"], capsys)
    assert rc == 2 and "command: 'knockout' -> 'contributions'" in err  # a single analysis cannot take a run's dir
    rc, _, err = run(["knockout", "--model", toy, "--out", str(d), *KO], capsys)
    assert rc == 2 and "already holds a finished run" in err and "--resume" in err
    assert snapshot(d) == before  # every refusal left the run as it was
    rc, out, _ = run(["knockout", "--model", toy, "--out", str(d), *KO[:-1], "--resume", "--threads", "2"], capsys)
    assert rc == 0 and "[knockout] kept from the earlier run (--resume)" in out
    assert (d / "knockout.csv").read_bytes() == before["knockout.csv"]
    assert run(["knockout", "--model", toy, "--out", str(d), *KO, "--seed", "1", "--overwrite"], capsys)[0] == 0
    m = json.loads((d / "manifest.json").read_text())
    assert m["config"]["seed"] == 1 and m["stages"]["knockout"]["status"] == "done" and m["finished"]
    assert (d / "knockout.csv").read_bytes() != before["knockout.csv"]


def test_interrupted_reproduce_is_flagged_and_resume_completes_it(toy: str, tmp_path: Path, monkeypatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    import modality_circuits.lens as lens
    import modality_circuits.sweeps.knockout as ko_mod

    clean, broken = tmp_path / "clean", tmp_path / "broken"
    assert run(["reproduce", "--model", toy, "--out", str(clean), *TINY], capsys)[0] == 0

    real = lens.contributions

    def boom(*a, **k):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(lens, "contributions", boom)
    with pytest.raises(RuntimeError, match="worker lost"):
        cli.main(["reproduce", "--model", toy, "--out", str(broken), *TINY])
    m = json.loads((broken / "manifest.json").read_text())
    assert m["stages"]["knockout"]["status"] == "done" and "finished" not in m
    assert m["stages"]["contributions"] == {"status": "failed", "seconds": m["stages"]["contributions"]["seconds"],
                                            "error": "RuntimeError: worker lost"}
    assert not (broken / "contributions.csv").exists()
    capsys.readouterr()
    rc, _, err = run(["report", str(broken), "--no-png"], capsys)
    assert rc == 0 and "warning: this run did not finish" in err and "never ran: anchors, heads" in err
    assert "This run did not finish" in (broken / "report.html").read_text()

    monkeypatch.setattr(lens, "contributions", real)
    calls = []
    real_sweep = ko_mod.knockout_sweep
    monkeypatch.setattr(ko_mod, "knockout_sweep", lambda *a, **k: calls.append(1) or real_sweep(*a, **k))
    knockout_before = (broken / "knockout.csv").read_bytes()
    rc, _, _ = run(["reproduce", "--model", toy, "--out", str(broken), *TINY, "--resume"], capsys)
    assert rc == 0 and calls == []  # the finished knockout stage was kept, not rerun
    assert (broken / "knockout.csv").read_bytes() == knockout_before
    m = json.loads((broken / "manifest.json").read_text())
    assert m["finished"] and all(v["status"] == "done" for v in m["stages"].values())
    assert set(m["resumed_from"]["kept"]) == {"mfr", "knockout"}
    assert "did not finish" not in (broken / "report.html").read_text()
    for name in ("knockout.csv", "contributions.csv", "anchors.csv", "heads_table.csv", "patching_flip.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(broken / name), pd.read_csv(clean / name), obj=name)


def test_default_directories_and_os_errors(toy: str, tmp_path: Path, monkeypatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["knockout", "--model", toy, *KO], capsys)[0] == 0
    assert run(["knockout", "--model", toy, *KO, "--seed", "2"], capsys)[0] == 0
    runs = sorted(p for p in (tmp_path / "runs" / "knockout").iterdir() if p.name != "latest")
    assert len(runs) == 2  # one directory per run, never a shared one
    latest = tmp_path / "runs" / "knockout" / "latest"
    assert latest.resolve() == runs[1].resolve()
    assert json.loads((latest / "manifest.json").read_text())["config"]["seed"] == 2

    (tmp_path / "afile").write_text("x")
    rc, _, err = run(["knockout", "--model", toy, *KO, "--out", str(tmp_path / "afile")], capsys)
    assert rc == 2 and "is a file, not a directory" in err

    from modality_circuits.cli.run import Run

    def full(self, df, name):
        raise OSError(28, "No space left on device", str(self.out / name))

    monkeypatch.setattr(Run, "csv", full)
    rc, _, err = run(["knockout", "--model", toy, *KO, "--out", str(tmp_path / "full")], capsys)
    assert rc == 2 and err.startswith("error: No space left on device (") and "Traceback" not in err
    m = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert m["stages"]["knockout"]["status"] == "failed" and "No space left" in m["stages"]["knockout"]["error"]
    assert not os.path.exists(tmp_path / "full" / "knockout.csv")


def test_sharded_knockout_merges_to_the_single_run(toy: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ko = ["--batch-size", "2", *KO]  # 4 samples: 2 work units; KO ends with --quiet
    single, sharded, half = tmp_path / "single", tmp_path / "sharded", tmp_path / "half"
    assert run(["knockout", "--model", toy, "--out", str(single), *ko], capsys)[0] == 0
    rc, out, _ = run(["knockout", "--model", toy, "--out", str(sharded), *ko[:-1], "--shard", "0/2"], capsys)
    assert rc == 0 and "shard 0/2 done; 1 of 2 units done over all shards, about" in out
    assert not (sharded / "knockout.csv").exists()
    assert json.loads((sharded / "manifest.json").read_text())["stages"]["knockout"]["status"] == "partial"
    assert run(["knockout", "--model", toy, "--out", str(sharded), *ko, "--shard", "1/2"], capsys)[0] == 0
    want = pd.read_csv(single / "knockout.csv")
    pd.testing.assert_frame_equal(pd.read_csv(sharded / "knockout.csv"), want)  # the completing shard wrote it
    rc, out, _ = run(["merge", str(sharded)], capsys)  # idempotent
    assert rc == 0 and out.startswith("[merge] 2 work units")
    pd.testing.assert_frame_equal(pd.read_csv(sharded / "knockout.csv"), want)
    assert json.loads((sharded / "manifest.json").read_text())["stages"]["knockout"]["status"] == "done"

    assert run(["knockout", "--model", toy, "--out", str(half), *ko, "--shard", "1/2"], capsys)[0] == 0
    rc, _, err = run(["merge", str(half)], capsys)
    assert rc == 2 and "1 of 2 work units" in err and "unit-00000" in err
    rc, _, err = run(["merge", str(single.parent / "nowhere")], capsys)
    assert rc == 2 and "no readable manifest.json" in err
    rc, _, err = run(["knockout", "--model", toy, "--out", str(half), *ko, "--shard", "2/2"], capsys)
    assert rc == 2 and "0 <= I < N" in err


@pytest.mark.slow
@pytest.mark.parametrize("executor", [["--executor", "ray", "--workers", "2"],
                                      ["--executor", "slurm", "--slurm-cluster", "local", "--workers", "2"]])
def test_executors_from_the_command_line_give_the_local_tables(toy: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               executor: list[str]) -> None:
    """Ray: the whole reproduce (MFR, knockout, variant reruns, head scores, blocking/amplification, patching as
    work units on 2 actors) writes the same tables as a local run. Slurm (submitit's local array): the knockout
    sweep (its processes start slowly)."""
    pytest.importorskip(executor[1] if executor[1] == "ray" else "submitit")
    whole = executor[1] == "ray"
    argv = (["reproduce", *TINY, "--n", "16", "--n-patch", "4", "--edges", "image->last,instruction->last",
             "--variants", "instruction_after_question", "--random-sets", "0"] if whole else ["knockout", *KO])
    tables = {}
    for name, extra in (("local", []), ("dist", executor)):
        d = tmp_path / name
        assert run([*argv, "--model", toy, "--out", str(d), *extra], capsys)[0] == 0
        tables[name] = {p.name: pd.read_csv(p) for p in sorted(d.glob("*.csv"))}
        assert (d / "units" / "knockout" / "plan.json").is_file()
    assert tables["dist"].keys() == tables["local"].keys()
    if whole:
        assert {"mfr.csv", "heads_table.csv", "patching_flip.csv", "path_patching.csv",
                "knockout_variants.csv"} <= set(tables["local"])
        units = {p.name for p in (tmp_path / "dist" / "units").iterdir()}
        assert {"mfr", "knockout", "knockout-instruction_after_question", "heads", "patching-flip",
                "patching-path"} <= units
    for f, df in tables["local"].items():
        pd.testing.assert_frame_equal(tables["dist"][f], df, obj=f)
    if whole:
        import ray

        assert not ray.is_initialized()  # the command stopped its actors and the local instance it started
    rc, _, err = run(["knockout", "--model", toy, "--out", str(tmp_path / "x"), *KO, *executor, "--shard", "0/2"],
                     capsys)
    assert rc == 2 and "both split the work units" in err and not (tmp_path / "x").exists()
