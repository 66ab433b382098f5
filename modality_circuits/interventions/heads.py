"""Head interventions as one idea: a per-head scale on the head's output ``z`` around a baseline.

``z' = baseline + α · (z − baseline)`` at the chosen (layer, head) pairs and positions:

* **zero ablation** (block): ``α = 0``, baseline 0;
* **mean ablation**: ``α = 0``, baseline = the head's mean ``z`` over a reference batch (:func:`mean_z`);
* **amplification**: ``α > 1``, baseline 0 (``α = 1`` is the identity).

Attention amplification instead scales a head's attention from query group ``dst`` to key group ``src`` by
``α`` before renormalisation (adds ``log α`` to those pre-softmax scores).

Scales may differ per batch row, which is how batched head scans ablate a different head in each copy of the
batch (:func:`scale_tensor_hooks`). Hooks read ``model.pos_offset`` to align position masks under a KV cache.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .._types import Float
from ..errors import InterventionError
from ..spans import Spans
from .core import Hook, align_mask, align_positions, align_rows, check_heads, check_layers
from .knockout import GroupLike, edge_mask, group_mask

HeadSet = Iterable[tuple[int, int]]


def normalize_heads(model: Any, heads: HeadSet) -> dict[int, list[int]]:
    """``[(layer, head), …]`` -> ``{layer: [heads]}`` with range checks (clear error on bad indices)."""
    out: dict[int, list[int]] = {}
    for lh in heads:
        if len(tuple(lh)) != 2:
            raise InterventionError(f"Heads are (layer, head) pairs; got {lh!r}.")
        layer, head = (int(x) for x in lh)
        layer = check_layers(model, [layer])[0]
        check_heads(model, [head])
        out.setdefault(layer, []).append(head)
    return out


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)) or alpha < 0:
        raise InterventionError(f"Scale α must be a finite number >= 0 (0 = ablate, 1 = identity, >1 = amplify); "
                                f"got {alpha!r}.")
    return float(alpha)


@torch.no_grad()
def mean_z(model: Any, batch: Any) -> Float[Tensor, "layer n_heads d_head"]:
    """Mean of each head's ``z`` over the non-padding positions of a reference batch (for mean ablation)."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names, return_type=None)
    m = batch.attention_mask.bool().to(model.cfg.device)
    return torch.stack([cache[n][m].mean(0) for n in names])  # [layer, n_heads, d_head]


def scale_tensor_hooks(model: Any, scales: dict[int, Tensor], positions: Tensor | None = None,
                       baseline: Tensor | None = None) -> list[Hook]:
    """Hooks applying ``z' = b + s·(z − b)`` with per-layer scales ``{layer: Float[rows, n_heads]}``.

    Args:
        positions: ``Bool[batch, pos]`` where to apply (None: every position).
        baseline: ``[layer, n_heads, d_head]`` (mean ablation) or None (0).
    """

    def make(layer: int, s: Tensor):
        def hook(z: Tensor, hook: Any) -> Tensor:  # z: [rows, pos, n_heads, d_head]
            n, q = z.shape[:2]
            sc = align_rows(s.to(z.device, z.dtype), n)[:, None, :, None]  # [rows, 1, n_heads, 1]
            if positions is not None:
                p = align_positions(positions.to(z.device), n, q, getattr(model, "pos_offset", 0))
                sc = torch.where(p[:, :, None, None], sc, torch.ones_like(sc))
            b = 0 if baseline is None else baseline[layer].to(z.device, z.dtype)[None, None]
            return b + sc * (z - b)
        return hook

    return [(f"blocks.{layer}.attn.hook_z", make(layer, s)) for layer, s in scales.items()]


def head_scale_hooks(model: Any, heads: HeadSet, alpha: float = 0.0, positions: Tensor | None = None,
                     baseline: Tensor | None = None) -> list[Hook]:
    """Scale the output of every head in ``heads`` by ``alpha`` (see module doc) at ``positions``."""
    alpha = _check_alpha(alpha)
    by_layer = normalize_heads(model, heads)
    scales = {}
    for layer, hs in by_layer.items():
        s = torch.ones(1, model.cfg.n_heads)
        s[0, hs] = alpha
        scales[layer] = s
    return scale_tensor_hooks(model, scales, positions, baseline)


@contextmanager
def block_heads(model: Any, heads: HeadSet, mode: str = "zero", reference: Any = None,
                positions: Tensor | None = None) -> Iterator[Any]:
    """Context manager: zero- or mean-ablate ``heads`` (mean needs a ``reference`` batch)."""
    if mode not in ("zero", "mean"):
        raise InterventionError(f"Ablation mode must be 'zero' or 'mean', got {mode!r}.")
    if mode == "mean" and reference is None:
        raise InterventionError("Mean ablation needs a reference batch: block_heads(..., mode='mean', reference=b).")
    base = mean_z(model, reference) if mode == "mean" else None
    with model.hooks(fwd_hooks=head_scale_hooks(model, heads, 0.0, positions, base)):
        yield model


@contextmanager
def amplify_heads(model: Any, heads: HeadSet, alpha: float, positions: Tensor | None = None) -> Iterator[Any]:
    """Context manager: multiply the output of ``heads`` by ``alpha``."""
    with model.hooks(fwd_hooks=head_scale_hooks(model, heads, alpha, positions)):
        yield model


def attention_scale_hooks(model: Any, spans: Spans, heads: HeadSet, alpha: float, src: GroupLike,
                          dst: GroupLike = "last") -> list[Hook]:
    """Scale ``heads``' attention from ``dst`` queries to ``src`` keys by ``alpha`` (renormalised)."""
    alpha = _check_alpha(alpha)
    if alpha == 0:
        raise InterventionError("Attention scaling needs α > 0 (use knockout() to remove attention).")
    by_layer = normalize_heads(model, heads)
    m = edge_mask(spans, src, dst)
    add = math.log(alpha)

    def make(hs: Sequence[int]):
        sel = torch.zeros(model.cfg.n_heads, dtype=torch.bool)
        sel[list(hs)] = True

        def hook(scores: Tensor, hook: Any) -> Tensor:
            n, H, q, k = scores.shape
            mm = align_mask(m.to(scores.device), n, q, k)[:, None] & sel.to(scores.device)[None, :, None, None]
            return scores + mm.to(scores.dtype) * add
        return hook

    return [(f"blocks.{layer}.attn.hook_attn_scores", make(hs)) for layer, hs in by_layer.items()]


@contextmanager
def amplify_attention(model: Any, spans: Spans, heads: HeadSet, alpha: float, src: GroupLike,
                      dst: GroupLike = "last") -> Iterator[Any]:
    """Context manager form of :func:`attention_scale_hooks`."""
    with model.hooks(fwd_hooks=attention_scale_hooks(model, spans, heads, alpha, src, dst)):
        yield model


__all__ = ["amplify_attention", "amplify_heads", "attention_scale_hooks", "block_heads", "group_mask",
           "head_scale_hooks", "mean_z", "normalize_heads", "scale_tensor_hooks"]
