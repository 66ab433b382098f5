"""One self-contained HTML report from a results directory (opens offline: no CDN, no network).

plotly.js is inlined once (``plotly.offline.get_plotlyjs()``) and every figure is embedded with
``fig.to_html(full_html=False, include_plotlyjs=False)``; circuitsvis's browser bundle (global ``CircuitsVis``)
is inlined once, and each attention view is a ``<div>`` plus a ``CircuitsVis.render`` call. A small script
collects JavaScript errors into ``<pre id="mc-js-errors">`` (so a headless browser's dumped DOM shows them).

The results directory is what ``modality-circuits reproduce`` (or the single-analysis commands) write; every
file is optional and a missing one leaves its section with a note:

==========================  ===========================================================================
``manifest.json``           versions, model (+ sha256 of its weights), data, seed, arguments, stage timings
``evaluate.json``           MFR per condition and general-ability accuracies (with failure counts)
``knockout.csv``            :func:`~modality_circuits.sweeps.knockout.knockout_sweep`'s tidy table
``knockout_stability.csv``  :func:`~modality_circuits.sweeps.stability.subset_stability` of it
``knockout_variants.csv``   the instruction/constraint edges on reordered prompts (column ``variant``)
``contributions.csv``       :func:`~modality_circuits.lens.contributions`'s tidy table
``anchors.csv``             :func:`~modality_circuits.lens.anchor_readout`'s table
``head_scores.csv``         :func:`~modality_circuits.sweeps.heads.head_scores` tables (column ``method``)
``heads_summary.csv``       :meth:`~modality_circuits.sweeps.head_experiment.HeadExperimentResult.summary`
``heads_selection.json``    selected heads, random sets, split sizes
``attention_views.json``    circuitsvis ``AttentionHeads`` props (:mod:`modality_circuits.viz.attention`)
``image_attention.json``    :class:`~modality_circuits.viz.image_attention.ImageAttention` dicts
==========================  ===========================================================================
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from . import viz
from .data.sample import CONDITION_LABELS
from .patching.engine import PatchResult
from .rundir import atomic_write_text
from .viz.patching import patching_heatmap

logger = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#23395d;color:#fff;padding:18px 32px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;opacity:.85}main{padding:8px 32px 40px;max-width:1400px}
nav{margin:12px 0 0}nav a{color:#cfe0ff;margin-right:14px;font-size:14px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:14px 20px;margin:18px 0}
h2{margin-top:4px;font-size:20px;color:#23395d}p.note{color:#555;font-size:14px;margin:6px 0}
p.warn{background:#fff4e5;border-left:4px solid #e8a33d;padding:8px 12px;font-size:14px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px}
th{background:#f0f3f8;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f5f5f5;padding:10px;overflow:auto;font-size:12px;max-height:420px}
.cv-view{margin:10px 0 24px;min-height:60px}#mc-js-errors{color:#b00;display:none}
#mc-js-errors[data-count]:not([data-count="0"]){display:block}
"""

ERROR_COLLECTOR = """<script>
window.__mcErrors = [];
function __mcRecord(msg) {
  window.__mcErrors.push(String(msg));
  var el = document.getElementById('mc-js-errors');
  if (el) { el.textContent = window.__mcErrors.join('\\n'); el.setAttribute('data-count', window.__mcErrors.length); }
}
window.addEventListener('error', function (e) { __mcRecord('error: ' + (e.message || e.type) + ' at ' +
  (e.filename || '') + ':' + (e.lineno || '')); });
window.addEventListener('unhandledrejection', function (e) { __mcRecord('unhandled rejection: ' + e.reason); });
</script>"""

FOOTER_SCRIPT = """<script>
window.addEventListener('load', function () {
  var el = document.getElementById('mc-js-errors');
  if (el && !el.hasAttribute('data-count')) { el.setAttribute('data-count', window.__mcErrors.length); }
  document.body.setAttribute('data-mc-loaded', '1');
});
</script>"""


def _read_csv(d: Path, name: str) -> pd.DataFrame | None:
    p = d / name
    if not p.is_file():
        return None
    try:
        return pd.read_csv(p)
    except pd.errors.EmptyDataError:  # a stage that found nothing to measure
        return pd.DataFrame()


def _read_json(d: Path, name: str) -> Any:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else None


class _Page:
    """Collects sections; figures get stable div ids and optional PNG export."""

    def __init__(self, png_dir: Path | None):
        self.sections: list[tuple[str, str, str]] = []
        self.n_fig = 0
        self.n_cv = 0
        self.png_dir = png_dir
        self.pngs: list[str] = []

    def figure(self, fig: Any, name: str) -> str:
        self.n_fig += 1
        if self.png_dir is not None and viz.save_png(fig, self.png_dir / f"{name}.png"):
            self.pngs.append(f"{name}.png")
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                           config={"displaylogo": False, "responsive": True})

    def attention(self, props: dict) -> str:
        self.n_cv += 1
        return viz.attention_heads_html(props, f"cv-{self.n_cv}")

    def add(self, key: str, title: str, body: str) -> None:
        self.sections.append((key, title, body))


def _missing(what: str) -> str:
    return f"<p class='note'><em>Not computed in this run ({html.escape(what)} missing).</em></p>"


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", classes="data")


def run_status(manifest: dict | None) -> dict[str, list[str]]:
    """``{"failed": […], "not_run": […]}``: the planned stages (``manifest["planned"]``, the report itself aside)
    that failed, were interrupted or are still marked running, and those never started; empty lists for a
    complete run or a manifest that predates stage status."""
    if not manifest or not manifest.get("planned"):
        return {"failed": [], "not_run": []}
    stages = manifest.get("stages", {})
    failed = [f"{k} ({v.get('status')}{': ' + v['error'] if v.get('error') else ''})" for k, v in stages.items()
              if k != "report" and v.get("status") != "done"]
    not_run = [k for k in manifest["planned"] if k != "report" and k not in stages]
    return {"failed": failed, "not_run": not_run}


def unfinished_note(manifest: dict | None) -> str:
    """A warning box for a run that stopped before its planned stages finished ('' otherwise)."""
    st = run_status(manifest)
    if not (st["failed"] or st["not_run"]):
        return ""
    parts = ([f"stopped in: {html.escape('; '.join(st['failed']))}"] if st["failed"] else []) + (
        [f"never ran: {html.escape(', '.join(st['not_run']))}"] if st["not_run"] else [])
    return ("<p class='warn'><strong>This run did not finish</strong> — " + ". ".join(parts)
            + ". Sections of those stages are missing or from an earlier stage; continue it with the same command "
            "and <code>--resume</code>.</p>")


def _largest_drops(kv: pd.DataFrame) -> pd.DataFrame:
    """Per condition, edge and prompt layout: the window centre with the most negative mean ``delta`` (×100)."""
    from .stats import summarize

    s = summarize(kv, "delta", ["condition", "edge", "variant", "layer"])
    worst = s.loc[s.groupby(["condition", "edge", "variant"], sort=False)["mean"].idxmin()]
    out = worst[["condition", "edge", "variant", "layer", "count"]].copy()
    for c in ("mean", "ci_low", "ci_high"):
        out[c] = (100 * worst[c]).round(1)
    return out.rename(columns={"layer": "centre", "count": "n", "mean": "largest drop %", "ci_low": "ci low",
                               "ci_high": "ci high"}).sort_values(["condition", "edge", "variant"])


def _study_sizes(manifest: dict) -> str:
    """The profile and the sample counts / layer windows the run used (what the report's numbers rest on)."""
    a = manifest.get("args", {})
    keys = ("n", "n_general", "centers", "window", "method", "heatmap_methods", "n_random", "n_failed_pool", "n_patch",
            "patch_every", "random_sets", "variants", "variant_n", "variant_every")
    parts = [f"{k}={a[k]}" for k in keys if a.get(k) is not None]
    d = manifest.get("data", {}).get("distractors")
    sizes = ", ".join(parts + ([f"distractors={d}"] if d is not None else []))
    return f"{manifest.get('study_profile', '?')} profile: {sizes}" if sizes else "?"


def _summary_section(manifest: dict | None, evaluation: dict | None) -> str:
    parts = []
    if manifest:
        m = manifest.get("model", {})
        d = manifest.get("data", {})
        parts.append("<table>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in [
                ("model", m.get("path", "?")), ("architecture", m.get("architecture", "?")),
                ("data", d.get("source", "?")), ("conflict samples", d.get("n_conflict", "?")),
                ("general-ability samples", d.get("n_general", "?")), ("seed", manifest.get("seed", "?")),
                ("command", manifest.get("command", "?")),
                ("study sizes", _study_sizes(manifest))]) + "</table>")
    if evaluation:
        rows = []
        for key in ("conflict_follow_image", "conflict_follow_text", "consistent", "image_probe", "text_probe"):
            label = CONDITION_LABELS[key]
            v = evaluation.get(key)
            if not v:
                continue
            n = v.get("n", evaluation.get("n_per_condition", "?"))
            o = v.get("open_form") or {}
            open_txt = (f"{100 * o['mfr']:.1f}% / {100 * o['competitor']:.1f}% / {100 * o['other']:.1f}%"
                        if o else "–")
            rows.append(f"<tr><td>{label}</td><td class='num'>{100 * v['accuracy']:.1f}%</td>"
                        f"<td class='num'>{v.get('failures', '?')}</td><td class='num'>{open_txt}</td>"
                        f"<td class='num'>{n}</td></tr>")
        vr = evaluation.get("no_instruction") or {}
        if vr:
            open_vr = f"{100 * vr['open']:.1f}%" if vr.get("open") is not None else "–"
            rows.append(f"<tr><td>no instruction: vision ratio (image answers among image or text answers)</td>"
                        f"<td class='num'>{100 * vr['closed']:.1f}%</td><td class='num'>–</td>"
                        f"<td class='num'>{open_vr} ({vr['open_image']} image / {vr['open_text']} text / "
                        f"{vr['open_other']} other)</td><td class='num'>{vr['n']}</td></tr>")
        parts.append("<p class='note'>Modality-following ratio (MFR). Closed form: the instructed modality's answer "
                     "out-scores the other's; open form: the greedy generation matches the instructed answer / the "
                     "other modality's answer / neither. General-ability accuracies below.</p>"
                     "<table><tr><th>condition</th><th>accuracy / MFR (closed)</th><th>failures</th>"
                     "<th>open form: follow / competitor / other</th><th>n</th></tr>" + "".join(rows) + "</table>")
    return "".join(parts) or _missing("manifest.json, evaluate.json")


def build_report(results_dir: str | Path, out: str | Path | None = None, png: bool = True,
                 title: str = "Modality following: instruction anchors report") -> Path:
    """Write ``report.html`` (or ``out``) for a results directory; returns its path."""
    import plotly.offline

    d = Path(results_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"results directory not found: {d}")
    out = Path(out) if out is not None else d / "report.html"
    page = _Page(d / "figures" if png else None)
    manifest = _read_json(d, "manifest.json")
    evaluation = _read_json(d, "evaluate.json")
    page.add("summary", "Summary", unfinished_note(manifest) + _summary_section(manifest, evaluation))

    def section(key: str, name: str, files: list[str], make: Callable[..., str], *loaded: Any) -> None:
        if any(x is None for x in loaded):
            page.add(key, name, _missing(", ".join(files)))
            return
        try:
            page.add(key, name, make(*loaded))
        except Exception as e:  # a broken file must not lose the rest of the report
            logger.warning("report section %r failed: %s", name, e)
            page.add(key, name, f"<p class='note'>Could not draw this section: {html.escape(str(e))}</p>")

    def _metric_text(df: Any) -> str:
        names = {"p_binary": "the binary following probability", "p_follow": "the (unconstrained) probability of "
                 "the following answer", "logit_diff": "the following − competitor log-probability difference"}
        m = str(df["metric"].iloc[0]).removesuffix("_first") if "metric" in df and len(df) else "p_binary"
        return names.get(m, m)

    ko = _read_csv(d, "knockout.csv")
    section("knockout", "Attention knockout (information flow)", ["knockout.csv"], lambda df: (
        "<p class='note'>Blocking attention from source to destination tokens (src ↛ dst) at a window of layers; "
        f"y = mean relative change of {_metric_text(df)} ×100 with a seeded bootstrap 95% CI over samples.</p>"
        + page.figure(viz.knockout_curves(df), "knockout")), ko)
    if ko is not None and "p_follow_delta" in ko.columns:
        section("knockout-unconstrained", "Knockout without the binary constraint", ["knockout.csv"], lambda df: (
            "<p class='note'>The same knockouts, read from the same forward passes without renormalising over the "
            "two answers: the relative change of the unconstrained probability of the following answer, and the "
            "change (percentage points) of the probability left outside both answers (1 − P(f) − P(c)). A drop of "
            "the binary score together with a rise outside both answers means the knockout breaks the answer "
            "format rather than flipping the modality.</p>"
            + page.figure(viz.knockout_curves(df, value="p_follow_delta", title="Attention knockout: relative "
                                              "change of the unconstrained P(following answer)"),
                          "knockout-unconstrained")
            + page.figure(viz.knockout_curves(df.assign(p_outside_change=df["p_outside"] - df["p_outside_base"]),
                                              value="p_outside_change", ylabel="change (percentage points)",
                                              title="Attention knockout: change of the probability outside both "
                                                    "answers"), "knockout-outside")), ko)
    kv = _read_csv(d, "knockout_variants.csv")
    if kv is not None:
        section("knockout-variants", "Position control: the same knockouts on reordered prompts",
                ["knockout_variants.csv"], lambda df: (
                    "<p class='note'>Edges into and out of the instruction and the format sentence, rerun with the "
                    "instruction after the question, instruction and format sentence swapped, and a filler sentence "
                    "inserted after the instruction. If the instruction's effect follows its <em>meaning</em>, its "
                    "curves keep their shape wherever it sits; if it follows its <em>position</em>, they move to the "
                    f"segment that now sits there. {df['sample_id'].nunique()} samples, window centres "
                    f"{', '.join(map(str, sorted(set(df['layer']))))}. The table gives each curve's largest drop "
                    "(mean relative change ×100, bootstrap 95% CI over samples).</p>"
                    + _table(_largest_drops(df))
                    + page.figure(viz.knockout_curves(df.assign(edge=df["edge"] + " · " + df["variant"]),
                                                      title="Attention knockout per prompt layout"),
                                  "knockout-variants")), kv)
    st = _read_csv(d, "knockout_stability.csv")
    section("knockout-stability", "Data-ratio stability of the knockout curves", ["knockout_stability.csv"],
            lambda df: (
                "<p class='note'>Each knockout curve recomputed on nested subsets of the samples (one seeded "
                "permutation; 0.2 … 1.0 of them) and compared with the curve on all samples (Pearson r over the layer "
                "windows; NaN for a flat curve).</p>" + page.figure(viz.stability_lines(df), "knockout-stability")),
            st)
    co = _read_csv(d, "contributions.csv")
    section("contributions", "Attention vs MLP contributions", ["contributions.csv"],
            lambda df: page.figure(viz.contribution_bars(df), "contributions") + (
                "<p class='note'>Failure stages: at which layer a failed sample's last position leans to the wrong "
                "answer (logit lens after each layer) — read with the attention vs MLP contributions above.</p>"
                + page.figure(viz.failure_stage_lines(df), "failure-stages") if "lens_follow" in df.columns
                else ""), co)
    an = _read_csv(d, "anchors.csv")
    section("anchors", "Anchor read-out (logit lens)", ["anchors.csv"], lambda df: (
        "<p class='note'>Latent Decision Alignment Rate (LDAR): per layer, the share of samples whose logit-lens "
        "decision at the token group (sign of the mean following − competitor logit difference over the group's "
        "tokens) equals the model's final answer, at the instruction tokens and the last position, with a seeded "
        "bootstrap 95% CI (0.5: chance).</p>"
        + page.figure(viz.anchor_lines(df), "anchors")), an)
    sel = _read_json(d, "heads_selection.json") or {}
    hs = _read_csv(d, "head_scores.csv")
    section("heads", "Head scores", ["head_scores.csv"], lambda df: (
        "<p class='note'>Mean score per head on the selection split (ring: selected heads).</p>"
        + page.figure(viz.head_heatmaps(df, selected=sel.get("selected", [])), "head_scores")), hs)
    sm = _read_csv(d, "heads_summary.csv")
    section("blocking", "Blocking and amplifying the selected heads", ["heads_summary.csv"], lambda df: (
        viz.results_table_html(df, split=sel.get("split_sizes"), selected=sel.get("selected", []),
                               n_random=sel.get("n_random"))), sm)
    pf = _read_csv(d, "patching_flip.csv")
    section("patching", "Activation patching: instruction flip", ["patching_flip.csv"], lambda df: (
        "<p class='note'>Residual stream (resid_pre) of the clean run patched, one token group × layer at a time, "
        "into the run with the other instruction; 1 = the clean answer preference fully restored, 0 = none.</p>"
        + page.figure(patching_heatmap(
            PatchResult.from_frame(df.drop(columns=["pair"], errors="ignore")),
            title="Activation patching of resid_pre by token group (instruction flip): 0 = corrupted, 1 = clean"),
            "patching_flip")), pf)
    pp = _read_csv(d, "path_patching.csv")
    section("path-patching", "Path patching: image → anchors → answer", ["path_patching.csv"], lambda df: (
        "<p class='note'>Image-swap pair: the image tokens' layer-0 residual from the other image, passed on only "
        "through the residual stream at the instruction tokens or at the last position entering each layer "
        "(noising; effect 1 = the whole image effect flows through that receiver).</p>"
        + page.figure(viz.path_effect_lines(df), "path_patching")), pp)
    views = _read_json(d, "attention_views.json")
    section("attention", "Attention patterns of the top heads", ["attention_views.json"], lambda vs: "".join(
        f"<h3>{html.escape(v.get('_title', ''))}</h3><p class='note'>Token groups: "
        f"{html.escape(', '.join(v.get('_meta', {}).get('groups', [])))}"
        f"{'; pooled: ' + ', '.join(v['_meta']['pooled']) if v.get('_meta', {}).get('pooled') else ''}. "
        "Weights are the model's (not renormalised over the shown tokens).</p>" + page.attention(v)
        for v in vs) or "<p class='note'>No views.</p>", views)
    ia = _read_json(d, "image_attention.json")
    section("image-attention", "Attention over the image", ["image_attention.json"], lambda items: (
        "<p class='note'>Attention from the query tokens to each image patch, on the vision tower's patch grid.</p>"
        + page.figure(viz.image_attention_figure([viz.ImageAttention.from_dict(x) for x in items]),
                      "image_attention")), ia)
    body_manifest = (f"<pre>{html.escape(json.dumps(manifest, indent=2))}</pre>" if manifest
                     else _missing("manifest.json"))
    if manifest and manifest.get("timings"):
        t = pd.DataFrame([{"stage": k, "seconds": v} for k, v in manifest["timings"].items()])
        body_manifest = _table(t) + body_manifest
    page.add("manifest", "Run manifest", body_manifest)

    nav = "".join(f"<a href='#{k}'>{html.escape(t)}</a>" for k, t, _ in page.sections)
    sections = "".join(f"<section id='{k}'><h2>{html.escape(t)}</h2>{b}</section>" for k, t, b in page.sections)
    cv_js = f"<script>{viz.circuitsvis_bundle()}</script>" if page.n_cv else ""
    subtitle = html.escape(str((manifest or {}).get("model", {}).get("path", d)))
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style>"
           f"{ERROR_COLLECTOR}<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>{cv_js}"
           f"</head><body><header><h1>{html.escape(title)}</h1><p>{subtitle}</p><nav>{nav}</nav></header>"
           f"<main><pre id='mc-js-errors'></pre>{sections}</main>{FOOTER_SCRIPT}</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, doc)
    logger.info("wrote %s (%d figures, %d attention views, %.1f MB)", out, page.n_fig, page.n_cv,
                out.stat().st_size / 1e6)
    return out
