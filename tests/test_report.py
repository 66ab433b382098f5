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

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MC_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; "
                                                              "`bash scripts/mc.sh test` does it where apt works)")


def write_tiny_toy(path: Path) -> Path:
    """A random 2-layer toy LLaVA saved in the shipped model's format."""
    from modality_circuits.testing import tiny_toy_checkpoint

    return tiny_toy_checkpoint(path)


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
    for section in ("summary", "knockout", "knockout-unconstrained", "knockout-variants", "knockout-stability",
                    "contributions", "anchors", "heads", "blocking", "attention", "image-attention", "manifest"):
        assert f"<section id='{section}'>" in html, section
    assert html.count("CircuitsVis.render(") == 2  # one view per condition
    assert "Heads selected on 4 conflict samples; evaluated on 4 disjoint samples." in html
    assert "random heads (mean ± std over 2 sets)" in html
    variants = html[html.index("<section id='knockout-variants'>"):]
    assert "largest drop %" in variants[:variants.index("</section>")]


def test_variant_table_picks_each_curves_largest_drop() -> None:
    import pandas as pd

    from modality_circuits.report import _largest_drops

    rows = [{"sample_id": i, "condition": "image", "edge": "instruction↛last", "variant": v, "layer": layer,
             "delta": d + 0.01 * i}
            for i in range(4) for v, drops in (("original", (-0.1, -0.5, 0.0)), ("swap", (-0.3, 0.0, -0.2)))
            for layer, d in zip((1, 4, 7), drops)]
    t = _largest_drops(pd.DataFrame(rows)).set_index("variant")
    assert t.loc["original", "centre"] == 4 and t.loc["swap", "centre"] == 1
    assert t.loc["original", "largest drop %"] == pytest.approx(-48.5) and t.loc["swap", "n"] == 4
    assert t.loc["original", "ci low"] <= -48.5 <= t.loc["original", "ci high"]


def test_missing_files_leave_notes(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"path": "m"}, "timings": {"load": 1.0}}))
    html = build_report(tmp_path, png=False).read_text()
    assert html.count("Not computed in this run") == 10  # every analysis section, patching and stability included
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
    # knockout (+ unconstrained, outside both answers, prompt variants, data-ratio stability), contributions,
    # failure stages, anchors, head scores, 2 patching, image attention
    assert len(fig_ids) == 12, fig_ids
    assert {"fig-knockout-variants", "fig-knockout-stability", "fig-failure-stages"} <= set(fig_ids)
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


# ------------------------------------------------------------------------------------ attention views
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_image_attention_matches_the_pattern(strategy: str) -> None:
    """The grid is the query's attention to the image tokens in row-major patch order (CLS dropped for "full")."""
    import numpy as np
    import torch

    from modality_circuits import HookedMLLM
    from modality_circuits.data import synthetic
    from modality_circuits.testing import tiny_bpe_tokenizer, tiny_llava
    from modality_circuits.viz.image_attention import image_attention_maps

    tok = tiny_bpe_tokenizer()
    model = HookedMLLM.from_hf(tiny_llava(tok, vision_feature_select_strategy=strategy), tok)
    samples = synthetic(2, seed=0, image_size=32)
    for s in samples:  # words the tiny tokenizer knows
        s.answer_img, s.answer_text = "red", "blue"
    batch = model.prepare(samples)
    maps = image_attention_maps(model, batch, 1, [("instruction", None, None), ("last", 1, 2), (-1, 1, 2)])
    _, cache = model.run_with_cache(batch)
    img = batch.spans.positions("image.0", 1)
    assert len(img) == 16 + (strategy == "full")
    a = cache["blocks.1.attn.hook_pattern"][1, 2, -1, img].numpy()  # last query, layer 1, head 2
    cls, patches = (a[0], a[1:]) if strategy == "full" else (0.0, a)
    for m in maps[1:]:
        np.testing.assert_allclose(m.grid, patches.reshape(4, 4), atol=1e-6)
        assert m.cls_mass == pytest.approx(float(cls), abs=1e-6)
    q = batch.spans.positions("instruction", 1)
    every = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][1][:, q][:, :, img] for i in range(2)])
    want = every.mean(2).mean(1).mean(0).numpy()[int(strategy == "full"):]
    np.testing.assert_allclose(maps[0].grid, want.reshape(4, 4), atol=1e-6)
    assert maps[0].image.shape == (32, 32, 3) and maps[0].image.dtype == np.uint8
    fig = viz.image_attention_figure(maps)
    assert len(fig.data) == 3 * 4  # image, heatmap, image + overlay per row


def test_attention_view_props_restrict_and_pool() -> None:
    import numpy as np

    from modality_circuits import HookedMLLM
    from modality_circuits.data import synthetic
    from modality_circuits.testing import tiny_bpe_tokenizer, tiny_llava

    tok = tiny_bpe_tokenizer()
    model = HookedMLLM.from_hf(tiny_llava(tok), tok)
    batch = model.prepare(synthetic(2, seed=0, image_size=32))
    full = viz.attention_view_props(model, batch, 0, [(0, 1), (1, 3)], groups=("image", "instruction", "last"))
    n = sum(int(batch.spans.mask(g, allow_empty=True)[0].sum()) for g in ("image", "instruction", "last"))
    att = np.asarray(full["attention"])
    assert att.shape == (2, n, n) and full["tokens"][0] == "<img_0>"
    assert full["attentionHeadNames"] == ["L0.H1", "L1.H3"]
    assert np.allclose(np.triu(att, 1), 0) and (att.sum(-1) <= 1 + 1e-5).all()
    pooled = viz.attention_view_props(model, batch, 0, [(0, 1)], groups=("image", "instruction", "last"),
                                      pool=["image"])
    p = np.asarray(pooled["attention"])[0]
    assert pooled["tokens"][0] == "[image]" and p.shape == (n - 15, n - 15)
    np.testing.assert_allclose(p[1:, 0], att[0, 16:, :16].sum(-1), atol=2e-4)  # keys: summed over the image
    html = viz.attention_heads_html(pooled, "v1")
    assert "CircuitsVis.AttentionHeads" in html and "_meta" not in html
