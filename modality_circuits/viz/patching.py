"""Figures of activation/path patching results (plotly) and circuitsvis views of the top heads.


* :func:`patching_heatmap`: a :class:`~modality_circuits.patching.engine.PatchResult` as a heatmap — layer ×
  position (token labels, coloured by token group in the hover), layer × group, layer × head; a 3-D result
  (``[layer, pos, head]`` …) gets one panel per entry of its last axis; 1-D results are bars.
* :func:`top_heads`: the heads with the largest patching effect.
* :func:`top_heads_attention`: circuitsvis ``AttentionHeads`` props (and a notebook view) of those heads,
  restricted to chosen token groups (via :func:`~modality_circuits.viz.attention.attention_view_props`).

Colours: diverging around 0 (the corrupted run) with the clean run at 1; the title says the direction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

DEFAULT_GROUPS = ("image", "context", "instruction", "last")


def _title(result: Any, title: str | None) -> str:
    if title:
        return title
    how = ("clean → corrupted run (denoising)" if result.direction == "denoise" else
           "corrupted → clean run (noising)")
    return f"Patching {result.component}: {result.metric}, {how}; 0 = corrupted, 1 = clean"


def _axis_labels(result: Any, axis: str) -> list[str]:
    labs = result.labels.get(axis, [])
    return [f"L{v}" if axis == "layer" else f"H{v}" if axis == "head" else str(v) for v in labs]


def _heatmap(result: Any, z: np.ndarray, raw: np.ndarray, y_axis: str, x_axis: str, showscale: bool,
             zmax: float) -> go.Heatmap:
    ys, xs = _axis_labels(result, y_axis), _axis_labels(result, x_axis)
    groups = result.pos_groups if x_axis == "pos" and result.pos_groups else [""] * len(xs)
    custom = np.stack([raw, np.broadcast_to(np.array(groups, dtype=object)[None, :], raw.shape)], -1)
    return go.Heatmap(z=z, x=xs, y=ys, customdata=custom, colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax,
                      showscale=showscale, colorbar=dict(thickness=10),
                      hovertemplate=f"{y_axis} %{{y}}, {x_axis} %{{x}} %{{customdata[1]}}<br>score %{{z:.4f}}"
                                    "<br>raw %{customdata[0]:.4f}<extra></extra>")


def patching_heatmap(result: Any, title: str | None = None, max_panels: int = 16, height: int | None = None
                     ) -> go.Figure:
    """A figure of a patching result (see module doc); ``max_panels`` caps the panels of a 3-D result."""
    vals = result.values.detach().float().cpu().numpy()
    raw = result.raw.detach().float().cpu().numpy()
    finite = np.isfinite(vals)
    zmax = float(max(1.0, np.abs(vals[finite]).max())) if finite.any() else 1.0
    t = _title(result, title)
    if vals.ndim == 0:
        fig = go.Figure(go.Bar(x=["score"], y=[float(vals)]))
    elif vals.ndim == 1:
        fig = go.Figure(go.Bar(x=_axis_labels(result, result.axes[0]), y=vals, customdata=raw,
                               hovertemplate="%{x}: %{y:.4f} (raw %{customdata:.4f})<extra></extra>"))
        fig.update_xaxes(title_text=result.axes[0])
    elif vals.ndim == 2:
        fig = go.Figure(_heatmap(result, vals, raw, result.axes[0], result.axes[1], True, zmax))
        fig.update_xaxes(title_text=result.axes[1], tickangle=-60 if result.axes[1] == "pos" else 0)
        fig.update_yaxes(title_text=result.axes[0], autorange="reversed")
    elif vals.ndim == 3:
        last = result.axes[2]
        n = min(vals.shape[2], max_panels)
        if vals.shape[2] > max_panels:
            logger.info("Showing %d of %d panels (%s).", n, vals.shape[2], last)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        names = _axis_labels(result, last)[:n]
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{last} {s}" for s in names],
                            horizontal_spacing=0.04, vertical_spacing=0.12)
        for i in range(n):
            fig.add_trace(_heatmap(result, vals[:, :, i], raw[:, :, i], result.axes[0], result.axes[1], i == 0, zmax),
                          row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(autorange="reversed")
    else:
        raise ValueError(f"Cannot draw a {vals.ndim}-D patching result.")
    fig.update_layout(title=t, template="plotly_white", height=height or (420 if vals.ndim < 3 else 300 * rows))
    return fig


def top_heads(result: Any, k: int = 5) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest ``|effect|`` in a result with ``layer`` and ``head`` axes (other axes
    are summed in absolute value)."""
    if "layer" not in result.axes or "head" not in result.axes:
        raise ValueError(f"top_heads needs a result with 'layer' and 'head' axes; got {result.axes}.")
    eff = result.effect.detach().float().abs().nan_to_num(0.0)
    li, hi = result.axes.index("layer"), result.axes.index("head")
    other = [d for d in range(eff.dim()) if d not in (li, hi)]
    if other:
        eff = eff.sum(dim=other)
    m = eff if li < hi else eff.T  # [layer, head]
    flat = m.flatten().argsort(descending=True)[:k].tolist()
    H = m.shape[1]
    return [(int(result.labels["layer"][i // H]), int(result.labels["head"][i % H])) for i in flat]


def top_heads_attention(model: HookedMLLM, pair: Any, result: Any, k: int = 4,
                        groups: Sequence[str] | None = DEFAULT_GROUPS,
                        row: int = 0, which: str = "clean", pool: Sequence[str] | None = None) -> tuple[dict, Any]:
    """circuitsvis ``AttentionHeads`` props of the top-``k`` heads of ``result`` on one prompt, restricted to
    ``groups`` (large groups pooled), and a notebook-displayable view of them.

    Args:
        which: ``"clean"`` or ``"corrupted"``: whose attention to show.
    """
    from .attention import attention_view_props, show_attention_heads

    if which not in ("clean", "corrupted"):
        raise ValueError(f"which must be 'clean' or 'corrupted'; got {which!r}.")
    heads = top_heads(result, k)
    batch = pair.clean if which == "clean" else pair.corrupted
    props = attention_view_props(model, batch, row, heads, groups=groups, pool=pool)
    props["_meta"]["patching"] = {"component": result.component, "direction": result.direction,
                                  "scores": [float(result.effect[_index(result, lh)]) for lh in heads]
                                  if result.values.dim() == 2 else None}
    return props, show_attention_heads(props)


def _index(result: Any, lh: tuple[int, int]) -> tuple[int, int]:
    li = result.labels["layer"].index(lh[0])
    hi = result.labels["head"].index(lh[1])
    return (li, hi) if result.axes.index("layer") < result.axes.index("head") else (hi, li)


__all__ = ["patching_heatmap", "top_heads", "top_heads_attention"]
