"""Notebooks 01-04 run on the toy model via nbmake (each < 2 min); all are stored without outputs.

05 needs a GPU and a local 7B checkpoint and is not executed. ``MC_MODEL`` points the notebooks at another model
folder (default: the shipped ``assets/toy-llava``); without a model the run is skipped with a reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from modality_circuits.resources import toy_model_path

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
RUN_IN_CI = sorted(NB_DIR.glob("0[1-4]*.ipynb"))
MODEL = Path(os.environ.get("MC_MODEL") or toy_model_path())
PER_NOTEBOOK_S = 120


def test_notebooks_present() -> None:
    names = [p.stem for p in sorted(NB_DIR.glob("*.ipynb"))]
    assert names == ["01_quickstart", "02_information_flow", "03_critical_heads", "04_patching",
                     "05_real_checkpoint_gpu"]


@pytest.mark.parametrize("path", sorted(NB_DIR.glob("*.ipynb")), ids=lambda p: p.stem)
def test_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


def test_builder_matches_committed(tmp_path: Path) -> None:
    """notebooks/build_notebooks.py is the source: rebuilding gives the committed files."""
    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for p in mod.build(tmp_path):
        assert p.read_text() == (NB_DIR / p.name).read_text(), f"{p.name} differs: run notebooks/build_notebooks.py"


def test_notebook_text_is_honest() -> None:
    def text(name: str) -> str:
        return "\n".join(c.source for c in nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4).cells)

    t4 = text("04_patching")
    assert "patch_resid_pre" in t4 and "path_patch" in t4  # uses the patching package it describes
    t5 = text("05_real_checkpoint_gpu")
    assert "Qwen2.5-VL" in t5 and "M-RoPE" in t5 and "Not executed in CI" in t5


@pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                    reason=f"no model at {MODEL} (the trained toy model ships in assets/toy-llava; or set MC_MODEL)")
def test_notebooks_run_with_nbmake(tmp_path: Path) -> None:
    report = tmp_path / "nbmake.xml"
    env = {**os.environ, "MC_MODEL": str(MODEL), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={PER_NOTEBOOK_S}", "-q",
                        "-p", "no:cacheprovider", f"--junitxml={report}", *map(str, RUN_IN_CI)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=len(RUN_IN_CI) * PER_NOTEBOOK_S + 120)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    times = {c.get("name") or c.get("classname"): float(c.get("time")) for c in cases}
    assert len(times) == len(RUN_IN_CI), times
    slow = {k: v for k, v in times.items() if v > PER_NOTEBOOK_S}
    assert not slow, f"notebooks over {PER_NOTEBOOK_S} s: {json.dumps(slow)}"
