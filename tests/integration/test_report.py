"""The HTML report: self-contained (no network), and every figure and attention view renders in headless Chromium.

The browser test needs Debian's ``chromium`` (``bash scripts/mc.sh test`` installs it when apt is available); it is
skipped with a reason otherwise. It saves a full-page screenshot to ``runs/test-artifacts/report_screenshot.png``
(``MC_ARTIFACTS`` overrides the folder) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from modality_circuits import cli, viz
from modality_circuits.report import ERROR_COLLECTOR, build_report
from modality_circuits.viz.export import find_chromium

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MC_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; "
                                                              "`bash scripts/mc.sh test` does it where apt works)")


def write_tiny_toy(path: Path) -> Path:
    """A random 2-layer toy LLaVA in the shipped model's format."""
    from modality_circuits.models.llava import LlavaAdapter
    from modality_circuits.toy.model import TOY_TEMPLATE, ToyConfig, toy_llava, word_level_tokenizer

    cfg = ToyConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, d_vision=16, vision_layers=1, vision_heads=2)
    tok = word_level_tokenizer()
    toy_llava(tok, cfg).save_pretrained(path)
    tok.save_pretrained(path)
    LlavaAdapter.default_image_processor(cfg.image_size).save_pretrained(path)
    (path / "prompt_template.json").write_text(json.dumps(TOY_TEMPLATE.__dict__))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = write_tiny_toy(tmp_path_factory.mktemp("toy"))
    out = tmp_path_factory.mktemp("results")
    assert cli.main(["reproduce", "--model", str(model), "--out", str(out), "--n", "8", "--n-general", "2",
                     "--n-random", "2", "--alphas", "2,4", "--batch-size", "8", "--threads", "1", "--no-png",
                     "--quiet"]) == 0
    return out


def chromium(url: str, *args: str, tmp: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any network fetch would fail
           "--virtual-time-budget=20000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_errors(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if "CONSOLE" in x and re.search(r"Uncaught|Error", x)]


# ------------------------------------------------------------------------------------------- structure
def test_report_is_self_contained(results: Path) -> None:
    import plotly.offline

    html = (results / "report.html").read_text()
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=["']?(https?:)?//""", html), \
        "the report must not load anything from the network"
    assert html.count(plotly.offline.get_plotlyjs()[:300]) == 1, "plotly.js must be inlined exactly once"
    assert html.count(viz.circuitsvis_bundle()[:300]) == 1, "the circuitsvis bundle must be inlined exactly once"
    assert "</script>" not in viz.circuitsvis_bundle()
    for section in ("summary", "knockout", "contributions", "anchors", "heads", "blocking", "attention",
                    "image-attention", "manifest"):
        assert f"<section id='{section}'>" in html, section
    assert html.count("CircuitsVis.render(") == 2  # one view per condition
    assert "Heads selected on 4 conflict samples; evaluated on 4 disjoint samples." in html
    assert "random heads (mean ± std over 2 sets)" in html


def test_missing_files_leave_notes(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"path": "m"}, "timings": {"load": 1.0}}))
    html = build_report(tmp_path, png=False).read_text()
    assert html.count("Not computed in this run") == 7
    assert "CircuitsVis" not in html.split("</head>")[0]  # no views: the bundle is left out


def test_broken_file_keeps_the_rest(results: Path, tmp_path: Path) -> None:
    for f in results.iterdir():
        if f.is_file() and f.suffix in (".csv", ".json"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "knockout.csv", index=False)  # wrong columns
    html = build_report(tmp_path, png=False).read_text()
    assert "Could not draw this section" in html and "fig-anchors" in html


def test_png_export_is_optional(tmp_path: Path) -> None:
    import plotly.graph_objects as go

    written = viz.save_png(go.Figure(), tmp_path / "f.png")
    assert written == (tmp_path / "f.png").is_file()
    if not viz.png_export_available():
        assert not written


# --------------------------------------------------------------------------------------------- browser
@needs_chromium
def test_error_collector_catches_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(f"<html><head>{ERROR_COLLECTOR}</head><body><pre id='mc-js-errors'></pre>"
                    "<script>undefinedFunction()</script></body></html>")
    dom = chromium(page.as_uri(), "--dump-dom", tmp=tmp_path).stdout
    assert 'data-count="1"' in dom and "undefinedFunction" in dom


@needs_chromium
def test_report_renders_in_chromium(results: Path, tmp_path: Path) -> None:
    src = (results / "report.html").read_text()
    p = chromium((results / "report.html").as_uri(), "--dump-dom", tmp=tmp_path)
    dom = p.stdout
    assert 'data-mc-loaded="1"' in dom, "the page did not finish loading"
    m = re.search(r'id="mc-js-errors"[^>]*data-count="(\d+)"[^>]*>([^<]*)', dom)
    assert m, "error collector missing from the DOM"
    assert m.group(1) == "0", f"JavaScript errors: {m.group(2)}"
    assert not console_errors(p.stderr), console_errors(p.stderr)
    fig_ids = re.findall(r'<div id="(fig-[\w-]+)"', src)
    assert len(fig_ids) == 5, fig_ids  # knockout, contributions, anchors, head scores, image attention
    for fid in fig_ids:
        i = dom.find(f'id="{fid}"')
        assert i >= 0, fid
        tag = dom[dom.rfind("<", 0, i):dom.find(">", i)]
        assert "js-plotly-plot" in tag, f"{fid} was not drawn by plotly"
        assert 'class="main-svg"' in dom[i:i + 5000], f"{fid} has no svg"
    cv_ids = re.findall(r'<div id="(cv-\d+)" class="cv-view"></div>', src)
    assert len(cv_ids) == 2
    for cid in cv_ids:
        i = dom.find(f'id="{cid}"')
        inner = dom[dom.find(">", i) + 1:dom.find(">", i) + 400]
        assert not inner.startswith("</div>") and "Head Selector" in inner, f"circuitsvis view {cid} is empty"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    if shot.exists():
        shot.unlink()
    chromium((results / "report.html").as_uri(), "--hide-scrollbars", "--window-size=1400,9000",
             f"--screenshot={shot}", tmp=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 50_000
