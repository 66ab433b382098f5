"""Plotly figures of the analyses, each built from the tidy table the analysis returns.

* :func:`knockout_curves` — the paper's Figs 2-3: x = layer, y = mean relative change ``Δ × 100`` of the binary
  following probability with bootstrap 95% CI error bars (:func:`~modality_circuits.stats.summarize`), one line per
  edge ``src ↛ dst``, one panel per condition (vision-following / text-following).
* :func:`stability_lines` — data-ratio stability: each nested subset's knockout curve against the full one.
* :func:`contribution_bars` — per layer, the mean direct contribution of attention vs MLP outputs to the
  following-minus-competitor logit difference, for successful and failed samples, per condition.
* :func:`failure_stage_lines` — logit lens at the last position per layer, successful vs failed samples.
* :func:`anchor_lines` — the latent decision alignment rate (LDAR) per layer, one line per token group.
* :func:`head_heatmaps` — layer × head score matrices, one panel per scoring method.
* :func:`results_table_html` — the blocking/amplification results table with random-head controls.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..data.sample import CONDITION_LABELS
from ..stats import summarize

logger = logging.getLogger(__name__)

#: Display names of the two conditions (the instructed modality) and of the control sample kinds.

PALETTE = qualitative.Plotly + qualitative.D3
#: Signed scores get a diverging colour scale centred on 0; non-negative ones a sequential scale.
SIGNED_METHODS = ("ablation", "attribution", "dla")


def _label(condition: str) -> str:
    return CONDITION_LABELS.get(condition, str(condition))


def _conditions(df: pd.DataFrame, conditions: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(df["condition"])) if "condition" in df else []
    if conditions is None:
        order = [c for c in ("image", "text") if c in present]
        return order + [c for c in present if c not in order]
    return [c for c in conditions if c in present] or list(conditions)


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=250)
    return fig


# ------------------------------------------------------------------------------------------- knockout
def knockout_curves(df: pd.DataFrame, value: str = "delta", edges: Sequence[str] | None = None,
                    conditions: Sequence[str] | None = None, band: bool = False, scale: float = 100.0,
                    title: str = "Attention knockout: relative change of the following probability",
                    ylabel: str | None = None) -> go.Figure:
    """Knockout curves from :func:`~modality_circuits.sweeps.knockout.knockout_sweep`'s table.

    Args:
        df: tidy knockout table (``condition, edge, layer`` and ``value``).
        edges: edges to draw, in order (default: all, in order of appearance).
        band: draw the 95% CI as a shaded band instead of error bars.
        scale: multiply the value (100: percent).
    """
    if df.empty:
        return _empty(title, "no knockout results")
    edges = list(edges) if edges is not None else list(dict.fromkeys(df["edge"]))
    conds = _conditions(df, conditions)
    s = summarize(df[df["edge"].isin(edges)], value, ["condition", "edge", "layer"])
    fig = make_subplots(rows=1, cols=len(conds), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[_label(c) for c in conds])
    for ci, cond in enumerate(conds, start=1):
        for ei, edge in enumerate(edges):
            d = s[(s["condition"] == cond) & (s["edge"] == edge)].sort_values("layer")
            if d.empty:
                continue
            color = PALETTE[ei % len(PALETTE)]
            y, lo, hi = d["mean"] * scale, d["ci_low"] * scale, d["ci_high"] * scale
            common = dict(legendgroup=edge, name=edge, showlegend=ci == 1, line=dict(color=color))
            if band:
                fig.add_trace(go.Scatter(x=list(d["layer"]) + list(d["layer"])[::-1], y=list(hi) + list(lo)[::-1],
                                         fill="toself", fillcolor=_rgba(color, 0.15), line=dict(width=0),
                                         hoverinfo="skip", legendgroup=edge, showlegend=False), row=1, col=ci)
                fig.add_trace(go.Scatter(x=d["layer"], y=y, mode="lines+markers", **common), row=1, col=ci)
            else:
                fig.add_trace(go.Scatter(x=d["layer"], y=y, mode="lines+markers",
                                         error_y=dict(type="data", symmetric=False, array=hi - y, arrayminus=y - lo,
                                                      thickness=1, width=3), **common), row=1, col=ci)
        fig.add_hline(y=0, line=dict(color="grey", width=1, dash="dot"), row=1, col=ci)
        fig.update_xaxes(title_text="layer", dtick=1 if df["layer"].nunique() <= 40 else None, row=1, col=ci)
    fig.update_yaxes(title_text=ylabel or f"relative change Δ{' (%)' if scale == 100 else ''}", row=1, col=1)
    fig.update_layout(title=title, height=480, legend_title_text="edge (src ↛ dst)", template="plotly_white",
                      legend=dict(font=dict(size=11), tracegroupgap=2))
    return fig


def _line_panels(df: pd.DataFrame, series: str, x: str, y: str, conds: Sequence[str],
                 error: tuple[str, str] | None = None, **scatter: Any) -> go.Figure:
    """One panel per condition, one line per value of ``series`` (colours shared across panels), ``y`` against
    ``x``; ``error``: the (low, high) columns of an interval drawn as error bars where the table has them."""
    fig = make_subplots(rows=1, cols=len(conds), shared_yaxes=True, subplot_titles=[_label(c) for c in conds],
                        horizontal_spacing=0.06)
    names = list(dict.fromkeys(df[series]))
    for ci, cond in enumerate(conds, start=1):
        for si, name in enumerate(names):
            d = df[(df["condition"] == cond) & (df[series] == name)].sort_values(x)
            if d.empty:
                continue
            err = None
            if error is not None and error[0] in d.columns:
                err = dict(type="data", symmetric=False, array=d[error[1]] - d[y], arrayminus=d[y] - d[error[0]],
                           thickness=1)
            extra = {k: (d[v] if k == "customdata" else v) for k, v in scatter.items()}
            fig.add_trace(go.Scatter(x=d[x], y=d[y], mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=ci == 1, line=dict(color=PALETTE[si % len(PALETTE)]), error_y=err,
                                     **extra), row=1, col=ci)
    return fig


def stability_lines(df: pd.DataFrame, conditions: Sequence[str] | None = None,
                    title: str = "Data-ratio stability: correlation of each subset's knockout curve with the full one"
                    ) -> go.Figure:
    """Pearson r of the subset curve with the full curve vs the fraction of samples, one line per edge, one panel
    per condition (:func:`~modality_circuits.sweeps.stability.subset_stability`'s table)."""
    if df.empty:
        return _empty(title, "no stability results")
    fig = _line_panels(df, "edge", "fraction", "pearson_r", _conditions(df, conditions), customdata="n_samples",
                       hovertemplate="%{x:.1f} (n=%{customdata}): r=%{y:.3f}")
    fig.update_xaxes(title_text="fraction of samples")
    fig.update_yaxes(title_text="Pearson r with the full curve", range=[-1.05, 1.05], row=1, col=1)
    fig.update_layout(title=title, height=400, legend_title_text="edge (src ↛ dst)", template="plotly_white")
    return fig


# -------------------------------------------------------------------------------------- contributions
def contribution_bars(df: pd.DataFrame, conditions: Sequence[str] | None = None, include_embed: bool = False,
                      title: str = "Direct contributions to the following − competitor logit difference "
                                   "(last position)") -> go.Figure:
    """Per layer, mean attention vs MLP contribution (95% CI), successful vs failed samples, per condition.

    ``df`` is :func:`~modality_circuits.lens.contributions`'s table (``condition, followed, kind, layer,
    contribution``).
    """
    if df.empty:
        return _empty(title, "no contribution results")
    d = df if include_embed else df[df["kind"] != "embed"]
    conds = _conditions(d, conditions)
    outcomes = [(True, "successful (follows the instruction)"), (False, "failed")]
    titles = [f"{_label(c)} — {name}" for c in conds for _, name in outcomes]
    fig = make_subplots(rows=len(conds), cols=2, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.12, horizontal_spacing=0.07)
    colors = {"attn": PALETTE[0], "mlp": PALETTE[1], "embed": PALETTE[2]}
    names = {"attn": "attention", "mlp": "MLP", "embed": "embedding"}
    for ri, cond in enumerate(conds, start=1):
        for ci, (ok, _) in enumerate(outcomes, start=1):
            sub = d[(d["condition"] == cond) & (d["followed"] == ok)]
            n = sub["sample_id"].nunique() if "sample_id" in sub else 0
            if sub.empty:
                sp = fig.get_subplot(ri, ci)  # paper coordinates: a panel without traces has no axes to refer to
                fig.add_annotation(text="no samples", showarrow=False, xref="paper", yref="paper",
                                   x=sum(sp.xaxis.domain) / 2, y=sum(sp.yaxis.domain) / 2)
                continue
            s = summarize(sub, "contribution", ["kind", "layer"])
            for kind in [k for k in ("embed", "attn", "mlp") if k in set(s["kind"])]:
                k = s[s["kind"] == kind].sort_values("layer")
                fig.add_trace(go.Bar(x=k["layer"], y=k["mean"], name=names[kind], legendgroup=kind,
                                     showlegend=ri == 1 and ci == 1, marker_color=colors[kind],
                                     error_y=dict(type="data", symmetric=False, array=k["ci_high"] - k["mean"],
                                                  arrayminus=k["mean"] - k["ci_low"], thickness=1),
                                     hovertemplate=f"{names[kind]} layer %{{x}}: %{{y:.3f}} (n={n})<extra></extra>"),
                              row=ri, col=ci)
            fig.layout.annotations[(ri - 1) * 2 + ci - 1].text += f" (n={n})"
        fig.update_yaxes(title_text="mean contribution", row=ri, col=1)
    for ci in (1, 2):
        fig.update_xaxes(title_text="layer", dtick=1, row=len(conds), col=ci)
    fig.update_layout(title=title, barmode="group", height=300 * len(conds) + 120, template="plotly_white")
    return fig


def failure_stage_lines(df: pd.DataFrame, conditions: Sequence[str] | None = None,
                        title: str = "Failure stages: logit lens at the last position, successful vs failed samples"
                        ) -> go.Figure:
    """Per layer (after its MLP), the mean logit-lens logit of the following (solid) and competitor (dashed)
    answer at the last position, for successful and failed samples, one panel per condition, bootstrap 95% CI.

    ``df`` is :func:`~modality_circuits.lens.contributions`' table (columns ``lens_follow``, ``lens_comp``).
    """
    if df.empty or "lens_follow" not in df.columns:
        return _empty(title, "no logit-lens columns (rerun contributions)")
    d = df[df["kind"] == "mlp"]
    conds = _conditions(d, conditions)
    fig = make_subplots(rows=1, cols=len(conds), shared_yaxes=True, subplot_titles=[_label(c) for c in conds],
                        horizontal_spacing=0.06)
    for ci, cond in enumerate(conds, start=1):
        for oi, (ok, name) in enumerate(((True, "successful"), (False, "failed"))):
            sub = d[(d["condition"] == cond) & (d["followed"] == ok)]
            if sub.empty:
                continue
            n = sub["sample_id"].nunique()
            for col, dash, answer in (("lens_follow", None, "following"), ("lens_comp", "dash", "competitor")):
                s = summarize(sub, col, ["layer"]).sort_values("layer")
                fig.add_trace(go.Scatter(
                    x=s["layer"], y=s["mean"], mode="lines", name=f"{name}: {answer} answer",
                    legendgroup=f"{name}{answer}", showlegend=ci == 1,
                    line=dict(color=PALETTE[oi], dash=dash),
                    error_y=dict(type="data", symmetric=False, array=s["ci_high"] - s["mean"],
                                 arrayminus=s["mean"] - s["ci_low"], thickness=1, width=2),
                    hovertemplate=f"{name} (n={n}), {answer}: layer %{{x}}: %{{y:.2f}}"), row=1, col=ci)
        fig.update_xaxes(title_text="layer (after its MLP)", row=1, col=ci)
    fig.update_yaxes(title_text="logit-lens logit (first answer token)", row=1, col=1)
    fig.update_layout(title=title, height=420, template="plotly_white")
    return fig


# ------------------------------------------------------------------------------------------- anchors
def anchor_lines(df: pd.DataFrame, value: str | None = None, conditions: Sequence[str] | None = None,
                 title: str | None = None) -> go.Figure:
    """Per layer, the LDAR (default; ``agreement``, ``follow_rate`` … on request) at each token group, one panel
    per condition, with error bars where the table has ``{value}_low``/``{value}_high``.

    ``df`` is :func:`~modality_circuits.lens.anchor_readout`'s table (``condition, group, layer, value``); tables
    written before LDAR existed fall back to ``agreement``.
    """
    value = value or ("ldar" if "ldar" in df.columns else "agreement")
    title = title or ("Anchor read-out: latent decision alignment rate (LDAR)" if value == "ldar"
                      else "Anchor read-out: logit-lens agreement with the final decision")
    if df.empty:
        return _empty(title, "no anchor read-out results")
    conds = _conditions(df, conditions)
    fig = _line_panels(df, "group", "layer", value, conds, error=(f"{value}_low", f"{value}_high"))
    fig.update_xaxes(title_text="layer", dtick=1 if df["layer"].max() < 16 else 3)
    if value in ("agreement", "follow_rate", "ldar"):
        for ci in range(1, len(conds) + 1):
            fig.add_hline(y=0.5, line=dict(color="grey", width=1, dash="dot"), row=1, col=ci)
    fig.update_yaxes(title_text="LDAR" if value == "ldar" else value.replace("_", " "), row=1, col=1)
    if value in ("agreement", "follow_rate", "ldar"):
        fig.update_yaxes(range=[-0.02, 1.02])
    fig.update_layout(title=title, height=400, legend_title_text="token group", template="plotly_white")
    return fig


# --------------------------------------------------------------------------------------------- heads
def head_heatmaps(scores: Mapping[str, np.ndarray] | pd.DataFrame, selected: Sequence[Sequence[int]] = (),
                  condition: str | None = None, title: str = "Head scores (layer × head; higher = more "
                                                             "important for following)") -> go.Figure:
    """One layer × head heatmap per scoring method; ``selected`` heads are marked with a ring.

    Args:
        scores: ``{method: [layer, head] array}``, or a tidy table with ``method, layer, head, score`` (as
            :func:`~modality_circuits.sweeps.heads.head_scores` returns; several methods concatenated).
        condition: with a tidy table, average only this condition's samples (default: both).
    """
    if isinstance(scores, pd.DataFrame):
        from ..sweeps.heads import score_matrix

        if scores.empty:
            return _empty(title, "no head scores")
        scores = {m: score_matrix(d, condition) for m, d in scores.groupby("method", sort=False)}
    if not scores:
        return _empty(title, "no head scores")
    methods = list(scores)
    n = len(methods)
    gap = 0.08
    fig = make_subplots(rows=1, cols=n, subplot_titles=methods, horizontal_spacing=gap)
    width = (1 - gap * (n - 1)) / n
    sel = [tuple(int(v) for v in h) for h in selected]
    for i, m in enumerate(methods):
        z = np.asarray(scores[m], dtype=float)
        signed = m in SIGNED_METHODS or np.nanmin(z) < 0
        zmax = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        x_end = i * (width + gap) + width
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(z.shape[1])), y=list(range(z.shape[0])),
            colorscale="RdBu_r" if signed else "Viridis", zmid=0 if signed else None,
            zmin=-zmax if signed else None, zmax=zmax if signed else None,
            colorbar=dict(x=x_end + 0.005, len=0.9, thickness=10, xanchor="left"),
            hovertemplate=f"{m}<br>layer %{{y}}, head %{{x}}: %{{z:.4f}}<extra></extra>"), row=1, col=i + 1)
        if sel:
            fig.add_trace(go.Scatter(x=[h for _, h in sel], y=[lyr for lyr, _ in sel], mode="markers",
                                     marker=dict(symbol="circle-open", size=14, color="black", line_width=2),
                                     name="selected", showlegend=i == 0, hoverinfo="skip"), row=1, col=i + 1)
        fig.update_xaxes(title_text="head", dtick=1 if z.shape[1] <= 40 else None, row=1, col=i + 1)
        fig.update_yaxes(title_text="layer" if i == 0 else None, dtick=1 if z.shape[0] <= 40 else None,
                         row=1, col=i + 1)
    fig.update_layout(title=title, height=420, template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


# ------------------------------------------------------------------------------------------- results
def _fmt(v: Any, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def results_table_html(summary: pd.DataFrame, split: Mapping[str, Any] | None = None,
                       selected: Sequence[Sequence[int]] = (), n_random: int | None = None) -> str:
    """The blocking/amplification table (HTML) from :meth:`HeadExperimentResult.summary`.

    Args:
        summary: one row per (condition, measure, intervention, alpha) with ``value``, ``n``, ``random_mean``,
            ``random_std`` (and ``ci_low``/``ci_high`` where computed, shown after the value).
        split: ``{"selection": n or ids, "evaluation": n or ids}`` (the disjoint splits).
        selected: the selected (layer, head) pairs.
    """
    if summary is None or summary.empty:
        return "<p><em>No blocking/amplification results.</em></p>"
    rows = []
    order = {"image": 0, "text": 1, "consistent": 2, "image_probe": 3, "text_probe": 4}
    sm = summary.copy()
    sm["_o"] = sm["condition"].map(lambda c: order.get(c, 9))
    sm["_m"] = sm["intervention"].map({"none": 0, "block": 1, "amplify": 3}).fillna(4)
    sm.loc[sm["measure"] == "failed", "_m"] = 2  # the failed-sample count heads the amplification rows
    sm = sm.sort_values(["_o", "_m", "alpha"], na_position="first")
    for _, r in sm.iterrows():
        meas, inter = r["measure"], r["intervention"]
        value = _fmt(r["value"])
        if pd.notna(r.get("ci_low")) and meas != "failed":
            value += f" <span class='ci'>[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]</span>"
        if meas == "failed":
            what, value = "failed samples to amplify (n: samples searched)", f"{int(r['value'])}"
        elif inter == "none":
            what = "MFR, no intervention" if meas == "mfr" else f"{meas}, no intervention"
        elif inter == "block":
            what = ("MFR with the heads blocked" if meas == "mfr" else f"{meas} with the heads blocked")
        else:
            what = f"failed samples restored by amplifying ×{r['alpha']:g}"
        rnd = "–" if inter == "none" else (
            f"{_fmt(r.get('random_mean'))} ± {_fmt(r.get('random_std'))}" if pd.notna(r.get("random_mean")) else "–")
        rows.append(f"<tr><td>{html.escape(_label(r['condition']))}</td><td>{html.escape(what)}</td>"
                    f"<td class='num'>{value}</td><td class='num'>{rnd}</td>"
                    f"<td class='num'>{int(r['n']) if pd.notna(r['n']) else '–'}</td></tr>")
    head = ("<tr><th>condition / samples</th><th>measure</th><th>selected heads [bootstrap 95% CI]</th>"
            f"<th>random heads (mean ± std{f' over {n_random} sets' if n_random else ''})</th><th>n</th></tr>")
    notes = []
    if split:
        def size(v: Any) -> int:
            return v if isinstance(v, int) else len(v)
        notes.append(f"Heads selected on {size(split.get('selection', 0))} conflict samples; evaluated on "
                     f"{size(split.get('evaluation', 0))} disjoint samples.")
    if selected:
        notes.append(f"{len(selected)} selected head(s) (layer.head): "
                     + ", ".join(f"L{int(a)}.H{int(b)}" for a, b in selected) + ".")
    note = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    return f"{note}<table class='results'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def path_effect_lines(df: pd.DataFrame, title: str = "Path patching: effect through each receiver") -> go.Figure:
    """Lines: effect (share of the sender's effect flowing through the receiver) per receiver layer."""
    if df.empty:
        return _empty(title, "no path-patching results")
    fig = go.Figure()
    for r, g in df.groupby("receiver", sort=False):
        fig.add_trace(go.Scatter(x=g["layer"], y=g["effect"], mode="lines+markers", name=f"via {r}"))
    fig.update_layout(title=title, xaxis_title="receiver: residual entering layer", yaxis_title="effect",
                      height=360)
    return fig
