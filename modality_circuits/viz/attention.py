"""circuitsvis attention views of chosen heads, restricted to chosen token groups.

:func:`attention_view_props` computes the props of circuitsvis's ``AttentionHeads`` component (``tokens``,
``attention [n_heads, dest, src]``, ``attentionHeadNames``) for one sample, keeping only the positions of the
chosen token groups (values are the model's attention weights, not renormalised over the kept positions).
Large groups (e.g. LLaVA's 576 image tokens) can be pooled into one pseudo-token: as a key it receives the
*sum* of the attention to the group, as a query it shows the *mean* row of the group's positions.

The props render offline in three ways: :func:`show_attention_heads` (a notebook cell, bundle inlined),
:func:`attention_heads_html` (a ``<div>`` + render call for a page that inlines :func:`circuitsvis_bundle`
once, as :mod:`modality_circuits.report` does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..prompts import MLLMBatch

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

DEFAULT_GROUPS = ("image", "context", "instruction", "last")


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (defines the global ``CircuitsVis``), safe to inline in a ``<script>``."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "")


@torch.no_grad()
def attention_view_props(model: HookedMLLM, batch: MLLMBatch, i: int, heads: Sequence[Sequence[int]],
                         groups: Sequence[str] | None = DEFAULT_GROUPS, pool: Sequence[str] | None = None,
                         pool_above: int = 64) -> dict:
    """circuitsvis ``AttentionHeads`` props for sample ``i`` of ``batch`` and heads ``[(layer, head), …]``.

    Args:
        groups: token groups to keep, in prompt order (None: every non-padding position). Missing groups are
            skipped.
        pool: groups to collapse into one pseudo-token ``[group]``; default: groups with more than
            ``pool_above`` positions in this sample.
    """
    if not heads:
        raise ValueError("attention_view_props needs at least one (layer, head).")
    heads = [(int(a), int(b)) for a, b in heads]
    one = batch.select([i])
    layers = sorted({lyr for lyr, _ in heads})
    names = [f"blocks.{lyr}.attn.hook_pattern" for lyr in layers]
    _, cache = model.run_with_cache(one, names_filter=lambda n: n in names, return_type=None)
    valid = one.attention_mask[0].bool().cpu()
    if groups is None:
        keep = valid.clone()
        present = []
    else:
        present = [g for g in groups if g in one.spans]
        keep = one.spans.mask(present, allow_empty=True)[0].cpu() & valid if present else valid.clone()
    pos = keep.nonzero().flatten().tolist()
    ids = one.tokens[0].cpu().tolist()
    labels_all = model.token_labels(ids)
    if pool is None:
        pool = [g for g in present if int(one.spans.mask(g, allow_empty=True)[0].sum()) > pool_above]
    # units: each kept position, or one pooled unit per pooled group (placed at the group's first position)
    units: list[tuple[str, list[int]]] = []
    pooled_of: dict[int, str] = {}
    for g in pool:
        for p in one.spans.mask(g, allow_empty=True)[0].nonzero().flatten().tolist():
            pooled_of.setdefault(p, g)
    seen: set[str] = set()
    for p in pos:
        g = pooled_of.get(p)
        if g is None:
            units.append((labels_all[p], [p]))
        elif g not in seen:
            seen.add(g)
            units.append((f"[{g}]", [q for q in pos if pooled_of.get(q) == g]))
    T = len(ids)
    keys = torch.zeros(len(units), T)  # unit <- positions (sum over a pooled key group)
    for u, (_, ps) in enumerate(units):
        keys[u, ps] = 1.0
    queries = keys / keys.sum(1, keepdim=True)  # mean over a pooled query group
    mats = []
    for lyr, h in heads:
        a = cache[f"blocks.{lyr}.attn.hook_pattern"][0, h].float().cpu()  # [q, k]
        mats.append((queries @ a @ keys.T).numpy())
    sample = batch.samples[i] if batch.samples is not None else None
    return {"tokens": [u[0] for u in units], "attention": np.round(np.stack(mats), 5).tolist(),
            "attentionHeadNames": [f"L{lyr}.H{h}" for lyr, h in heads],
            "maskUpperTri": True,
            # colours saturate at the 99th percentile of the shown causal weights (attention is spread thin over
            # long prompts, and a few early rows near 1 would wash everything else out)
            "maxValue": _color_max(mats), "minValue": 0.0,
            "_meta": {"groups": present, "pooled": list(pool), "sample_id": getattr(sample, "id", str(i)),
                      "condition": getattr(sample, "follow", None)}}


def _color_max(mats: Sequence[np.ndarray]) -> float:
    vals = np.concatenate([m[np.tril_indices(m.shape[0])] for m in mats])
    return float(max(1e-6, np.percentile(vals, 99))) if vals.size else 1.0


def _js_props(props: dict) -> str:
    from circuitsvis.utils.convert_props import convert_props

    clean = {k: v for k, v in props.items() if not k.startswith("_")}
    return convert_props(clean).replace("</", "<\\/")


def attention_heads_html(props: dict, div_id: str) -> str:
    """A ``<div>`` and the call rendering it (needs :func:`circuitsvis_bundle` inlined once before)."""
    return (f'<div id="{div_id}" class="cv-view"></div>\n'
            f'<script>CircuitsVis.render({json.dumps(div_id)}, CircuitsVis.AttentionHeads, {_js_props(props)});'
            f'</script>')


class _LocalHTML:
    def __init__(self, src: str):
        self.src = src

    def _repr_html_(self) -> str:
        return self.src


def show_attention_heads(props: dict) -> Any:
    """A notebook-displayable circuitsvis view of the props, with the bundle inlined (works offline)."""
    from circuitsvis.utils.render import render_local

    clean = {k: v for k, v in props.items() if not k.startswith("_")}
    return _LocalHTML(render_local("AttentionHeads", **clean))
