"""Attention knockout between token groups: ``src ↛ dst`` (queries in ``dst`` may not attend to keys in ``src``).

Implemented on ``blocks.L.attn.hook_attn_scores`` by setting the masked pre-softmax scores to ``-inf``, so each
query row renormalises over the keys that are left (unmasked pairs keep their ratios). **A query whose every
key is masked** (possible only when ``src`` covers all of a ``dst`` query's visible keys, itself included)
gets an all-zero pattern row: TransformerLens replaces the NaN of an all ``-inf`` softmax by 0, so that head
writes only its output bias at that position; no NaN reaches the residual stream.

Groups come from :class:`~modality_circuits.spans.Spans` (``image``, ``context``, ``instruction``,
``constraint``, ``system``, ``question``, ``last``, any segment name, or several as a list) or an explicit
``Bool[Tensor, "batch pos"]`` mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .._types import Bool, Float
from ..spans import Spans
from .core import Hook, align_mask, check_heads, check_layers

GroupLike = str | Sequence[str] | Tensor


def group_mask(spans: Spans, group: GroupLike, allow_empty: bool = False) -> Bool[Tensor, "batch pos"]:
    """A group name / list of names / explicit mask -> ``Bool[Tensor, "batch pos"]``."""
    if isinstance(group, Tensor):
        return group.bool()
    return spans.mask(group if isinstance(group, str) else list(group), allow_empty=allow_empty)


def edge_mask(spans: Spans, src: GroupLike, dst: GroupLike, allow_empty: bool = False
              ) -> Bool[Tensor, "batch q_pos k_pos"]:
    """True at (query in ``dst``, key in ``src``): the score entries a knockout removes."""
    s = group_mask(spans, src, allow_empty)
    d = group_mask(spans, dst, allow_empty)
    return d[:, :, None] & s[:, None, :]


def mask_scores(scores: Float[Tensor, "batch n_heads q_pos k_pos"], mask: Tensor,
                heads: Sequence[int] | None = None) -> Tensor:
    """Pure function: ``scores`` with entries under ``mask`` set to ``-inf`` (only for ``heads`` if given).

    ``mask`` is ``[b, L, L]`` or ``[b, n_heads, L, L]`` in prompt coordinates; it is aligned to the scores
    (repeated rows, cached-prefix offset) with :func:`~modality_circuits.interventions.core.align_mask`.
    """
    n, H, q, k = scores.shape
    m = align_mask(mask.to(scores.device), n, q, k)
    if m.dim() == 3:
        m = m[:, None]
    if heads is not None:
        sel = torch.zeros(H, dtype=torch.bool, device=scores.device)
        sel[list(heads)] = True
        m = m & sel[None, :, None, None]
    return scores.masked_fill(m, float("-inf"))


def knockout_hooks(model: Any, spans: Spans, src: GroupLike, dst: GroupLike, layers: Sequence[int] | int,
                   heads: Sequence[int] | None = None, allow_empty: bool = False) -> list[Hook]:
    """Forward hooks that knock out ``src ↛ dst`` at ``layers`` (and only ``heads``, if given)."""
    layers = check_layers(model, layers)
    heads = check_heads(model, heads)
    m = edge_mask(spans, src, dst, allow_empty)

    def hook(scores: Tensor, hook: Any) -> Tensor:
        return mask_scores(scores, m, heads)

    return [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in layers]


@contextmanager
def knockout(model: Any, spans: Spans, src: GroupLike, dst: GroupLike, layers: Sequence[int] | int,
             heads: Sequence[int] | None = None, allow_empty: bool = False) -> Iterator[Any]:
    """Context manager: every forward inside runs with ``src ↛ dst`` knocked out at ``layers``.

    Example::

        with knockout(model, batch.spans, src="image", dst="instruction", layers=range(0, 2)):
            cut = following_scores(model, batch)
    """
    with model.hooks(fwd_hooks=knockout_hooks(model, spans, src, dst, layers, heads, allow_empty)):
        yield model


def block_mask_hooks(masks: dict[int, Tensor]) -> list[Hook]:
    """Hooks from precomputed per-layer score masks ``{layer: Bool[rows, (n_heads,) L, L]}`` (batched sweeps)."""

    def make(m: Tensor):
        def hook(scores: Tensor, hook: Any) -> Tensor:
            return mask_scores(scores, m)
        return hook

    return [(f"blocks.{layer}.attn.hook_attn_scores", make(m)) for layer, m in masks.items()]
