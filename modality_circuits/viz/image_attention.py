"""Attention over the image: how much a query position attends to each image patch, drawn on the image grid.

For LLaVA the image tokens of one image are the vision tower's patches in row-major order, a square grid of
``image_size // patch_size`` patches per side (576 = 24² for LLaVA-1.5 at 336 px / 14 px; 16 = 4² for the toy
model). With ``vision_feature_select_strategy == "full"`` the first image token is CLIP's CLS token, which has no
place on the grid and is dropped (its attention is reported separately as ``cls_mass``).

:func:`image_attention_maps` records, in one forward pass, only the attention rows of the chosen query groups to
the image's tokens (cheap even for a 7B model: nothing else of the pattern is kept), and returns one
:class:`ImageAttention` per requested (query, layer, head) — ``layer``/``head`` ``None`` meaning averaged.
The image shown is the one the model saw: the processed pixels (resized / cropped), un-normalized.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..data.sample import CONDITION_LABELS
from ..errors import ModalityCircuitsError
from ..prompts import MLLMBatch

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

Spec = tuple[str | int, int | None, int | None]  # (query group or position, layer or None, head or None)


@dataclass
class ImageAttention:
    """Attention from a query to one image's patches.

    Attributes:
        grid: ``[g, g]`` attention weights per patch (row-major as the vision tower reads the image).
        image: ``[H, W, 3]`` uint8 pixels as the model saw them.
        query: the query group name (mean over its positions) or a position.
        layer / head: the layer and head, ``None`` where averaged.
        mass: total attention of the query to the image's patches (the sum of ``grid``).
        cls_mass: attention to the CLS token (``"full"`` strategy), else 0.
    """

    grid: np.ndarray
    image: np.ndarray
    query: str | int
    layer: int | None
    head: int | None
    sample_id: str = ""
    condition: str | None = None
    mass: float = 0.0
    cls_mass: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        where = ("all layers" if self.layer is None else f"layer {self.layer}") + ", " + (
            "mean over heads" if self.head is None else f"head {self.head}")
        cond = CONDITION_LABELS.get(self.condition or "", self.condition)
        return (f"{self.sample_id}{f' ({cond})' if cond else ''} — query: {self.query} — {where} — "
                f"{100 * self.mass:.1f}% of its attention on the image")

    def to_dict(self) -> dict:
        """JSON-safe form (the image as a base64 PNG)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        d = asdict(self)
        d["grid"] = np.round(self.grid, 6).tolist()
        d["image"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return d

    @staticmethod
    def from_dict(d: dict) -> ImageAttention:
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(d["image"]))).convert("RGB"))
        return ImageAttention(**{**d, "grid": np.asarray(d["grid"], dtype=float), "image": img})


@torch.no_grad()
def image_attention_maps(model: HookedMLLM, batch: MLLMBatch, i: int = 0,
                         specs: Sequence[Spec] = (("last", None, None),),
                         image_index: int = 0) -> list[ImageAttention]:
    """One :class:`ImageAttention` per spec ``(query, layer, head)`` for sample ``i`` of ``batch``.

    Args:
        specs: ``query`` is a token group (mean over its positions, e.g. ``"instruction"``, ``"last"``) or a
            position in the padded sequence (negative counts from the end); ``layer``/``head`` ``None`` averages.
        image_index: which of the sample's images.
    """
    enc = model.image_encoder
    one = batch.select([i])
    group = f"image.{image_index}"
    if group not in one.spans or not bool(one.spans.mask(group, allow_empty=True)[0].any()):
        raise ModalityCircuitsError(f"Sample {i} has no image {image_index} (groups: {one.spans.names}).")
    grid_spec = enc.image_grid(one.model_inputs, image_index)  # the sample's k-th image is the k-th of `one`
    if grid_spec.part:  # the grid covers one part of the image's tokens (LLaVA-NeXT: the base tile)
        group = f"{group}.{grid_spec.part}"
    kpos = one.spans.positions(group, 0).cpu()
    has_cls = grid_spec.has_cls
    if len(kpos) != grid_spec.n_tokens:
        raise ModalityCircuitsError(
            f"Image {image_index} has {len(kpos)} tokens, but its {grid_spec.rows}×{grid_spec.cols} patch grid"
            f"{' + CLS' if has_cls else ''} has {grid_spec.n_tokens}.")
    qpos: dict[str | int, list[int]] = {}
    T = one.seq_len
    for q, _, _ in specs:
        if isinstance(q, (int, np.integer)):
            if not -T <= int(q) < T:
                raise ModalityCircuitsError(f"Query position {q} is out of range for a sequence of length {T}.")
            qpos[q] = [int(q) % T]
        else:
            ps = one.spans.positions(q, 0).tolist()  # raises SpanError naming the groups if unknown
            if not ps:
                raise ModalityCircuitsError(f"Query group {q!r} is empty in sample {i}.")
            qpos[q] = ps
    all_q = sorted({p for ps in qpos.values() for p in ps})
    need_all = any(layer is None for _, layer, _ in specs)
    layers = list(range(model.cfg.n_layers)) if need_all else sorted({layer for _, layer, _ in specs})
    from ..interventions.core import check_layers

    layers = check_layers(model, layers)
    rows: dict[int, torch.Tensor] = {}
    q_idx = torch.tensor(all_q)

    def keep(pattern: torch.Tensor, hook: Any) -> None:  # pattern [1, n_heads, q, k]
        rows[int(hook.name.split(".")[1])] = pattern[0][:, q_idx][:, :, kpos].float().cpu()  # [heads, nq, nimg]

    with model.hooks(fwd_hooks=[(f"blocks.{lyr}.attn.hook_pattern", keep) for lyr in layers]):
        model(one, return_type=None)
    image = enc.image_pixels(one.model_inputs, image_index)
    if image is None:
        image = np.zeros((grid_spec.rows, grid_spec.cols, 3), dtype=np.uint8)
    sample = one.samples[0] if one.samples is not None else None
    out = []
    for q, layer, head in specs:
        if head is not None and not 0 <= int(head) < model.cfg.n_heads:
            raise ModalityCircuitsError(f"Head {head} is out of range (the model has {model.cfg.n_heads} heads).")
        sel = [all_q.index(p) for p in qpos[q]]
        stack = torch.stack([rows[lyr] for lyr in (layers if layer is None else [int(layer)])])  # [L, H, nq, nimg]
        a = stack[:, :, sel].mean(2)  # mean over query positions: [L, H, nimg]
        a = a.mean(1) if head is None else a[:, int(head)]
        a = a.mean(0).numpy()  # [nimg]
        cls = float(a[0]) if has_cls else 0.0
        grid = a[int(has_cls):].reshape(grid_spec.rows, grid_spec.cols)
        out.append(ImageAttention(grid=grid, image=image, query=q, layer=None if layer is None else int(layer),
                                  head=None if head is None else int(head), sample_id=getattr(sample, "id", str(i)),
                                  condition=getattr(sample, "follow", None), mass=float(grid.sum()), cls_mass=cls))
    return out


def image_attention(model: HookedMLLM, batch: MLLMBatch, i: int = 0, query: str | int = "last",
                    layer: int | None = None,
                    head: int | None = None, image_index: int = 0) -> ImageAttention:
    """Attention from ``query`` to the patches of image ``image_index`` of sample ``i`` (see the module doc)."""
    return image_attention_maps(model, batch, i, [(query, layer, head)], image_index)[0]


def image_attention_figure(maps: ImageAttention | Sequence[ImageAttention], overlay: bool = True,
                           opacity: float = 0.55, title: str = "Attention over the image") -> go.Figure:
    """Rows of [image | attention on the patch grid | overlay] (the overlay column with ``overlay=True``)."""
    maps = [maps] if isinstance(maps, ImageAttention) else list(maps)
    if not maps:
        fig = go.Figure()
        fig.update_layout(title=title + " (nothing to show)", height=200)
        return fig
    cols = 3 if overlay else 2
    titles = []
    for _ in maps:
        titles += ["image (as the model sees it)", "attention per patch"] + (["overlay"] if overlay else [])
    fig = make_subplots(rows=len(maps), cols=cols, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.5 / max(1, len(maps)))
    for r, m in enumerate(maps, start=1):
        H, W = m.image.shape[:2]
        g = m.grid.shape[0]
        cell_h, cell_w = H / g, W / m.grid.shape[1]
        # colours from 0 to this map's largest weight; the floor (1% of the query's attention spread evenly) keeps
        # a head that hardly looks at the image dark instead of stretching noise over the whole scale
        zmax = max(float(m.grid.max()), 0.01 / m.grid.size)
        heat = dict(z=m.grid, x0=cell_w / 2, dx=cell_w, y0=cell_h / 2, dy=cell_h, zmin=0.0, zmax=zmax,
                    colorscale="Inferno", hovertemplate="patch row %{y:.0f}px, col %{x:.0f}px: %{z:.4f}<extra></extra>")
        fig.add_trace(go.Image(z=m.image, hoverinfo="skip"), row=r, col=1)
        ydom = fig.get_subplot(r, 2).yaxis.domain
        fig.add_trace(go.Heatmap(**heat, colorbar=dict(len=(ydom[1] - ydom[0]), y=(ydom[0] + ydom[1]) / 2,
                                                       thickness=10, title="attn")), row=r, col=2)
        if overlay:
            fig.add_trace(go.Image(z=m.image, hoverinfo="skip"), row=r, col=3)
            fig.add_trace(go.Heatmap(**heat, opacity=opacity, showscale=False), row=r, col=3)
        for c in range(1, cols + 1):
            fig.update_xaxes(range=[0, W], showticklabels=False, showgrid=False, zeroline=False,
                             constrain="domain", row=r, col=c)
            fig.update_yaxes(range=[H, 0], showticklabels=False, showgrid=False, zeroline=False,
                             scaleanchor=fig.get_subplot(r, c).xaxis.plotly_name.replace("axis", ""),
                             constrain="domain", row=r, col=c)
        fig.add_annotation(text=f"<b>{m.title}</b>", showarrow=False, xref="paper", yref="paper", x=0,
                           y=fig.get_subplot(r, 1).yaxis.domain[1], yanchor="bottom", yshift=26,
                           xanchor="left", font=dict(size=13))
    fig.update_layout(title=title, height=340 * len(maps) + 120, template="plotly_white", showlegend=False,
                      margin=dict(t=150))
    return fig
