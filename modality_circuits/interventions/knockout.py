"""Attention knockout between token groups: ``src ↛ dst`` (queries in ``dst`` may not attend to keys in ``src``).

Implemented on ``blocks.L.attn.hook_attn_scores`` by setting the masked pre-softmax scores to ``-inf``, so each
query row renormalises over the keys that are left (unmasked pairs keep their ratios). **A query whose every
key is masked** (possible only when ``src`` covers all of a ``dst`` query's visible keys, itself included)
gets an all-zero pattern row: TransformerLens replaces the NaN of an all ``-inf`` softmax by 0, so that head
writes only its output bias at that position; no NaN reaches the residual stream.

Groups are :data:`~modality_circuits.spans.GroupSpec` (a name such as ``image``, ``context``, ``instruction``,
``constraint``, ``system``, ``question``, ``last``; several names; or a ``Bool[Tensor, "batch pos"]`` mask).
:class:`Knockout` is the intervention; :func:`knockout` its context-manager form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from torch import Tensor

from .._types import Bool, Float
from ..errors import InterventionError
from ..models.forward_state import ForwardState
from ..prompts import MLLMBatch
from ..spans import GroupSpec, Spans, check_group_spec
from .base import HookFn, Intervention, apply
from .core import align_mask, check_heads, check_layers, first_query_seeing

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM


def edge_mask(spans: Spans, src: GroupSpec, dst: GroupSpec, allow_empty: bool = False
              ) -> Bool[Tensor, "batch q_pos k_pos"]:
    """True at (query in ``dst``, key in ``src``): the score entries a knockout removes."""
    s = spans.resolve(src, allow_empty)
    d = spans.resolve(dst, allow_empty)
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


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
@dataclass(frozen=True, eq=False)
class Knockout(Intervention):
    """``src ↛ dst`` at ``layers`` (and only query heads ``heads`` of each, if given).

    Attributes:
        src, dst: key and query token groups (:data:`~modality_circuits.spans.GroupSpec`).
        layers: a layer or layers (negative indices allowed).
        heads: ``(layer, head)`` pairs to cut, each in one of ``layers`` (None: every head of those layers).
        allow_empty: accept a group that is empty in some sample (that sample is then unchanged).
    """

    src: GroupSpec
    dst: GroupSpec
    layers: int | Sequence[int]
    heads: Sequence[tuple[int, int]] | None = None
    allow_empty: bool = False

    def __post_init__(self) -> None:
        if self.heads is not None:
            from .heads import as_head_pairs

            object.__setattr__(self, "heads", as_head_pairs(self.heads))
        object.__setattr__(self, "src", check_group_spec(self.src, "knockout source"))
        object.__setattr__(self, "dst", check_group_spec(self.dst, "knockout destination"))
        if not isinstance(self.layers, int):
            object.__setattr__(self, "layers", tuple(self.layers))

    def first_layer(self, model: HookedMLLM) -> int:
        return min(check_layers(model, self.layers), default=model.cfg.n_layers)

    def first_position(self, batch: MLLMBatch) -> int:
        return first_query_seeing(batch.spans, self.src, self.dst)

    def hooks(self, model: HookedMLLM, batch: MLLMBatch) -> list[tuple[str, HookFn]]:
        layers = check_layers(model, self.layers)
        per_layer: dict[int, list[int] | None] = {layer: None for layer in layers}
        if self.heads is not None:
            per_layer = {layer: [] for layer in layers}
            for layer, head in self.heads:
                layer = check_layers(model, [layer])[0]
                if layer not in per_layer:
                    raise InterventionError(f"Knockout head ({layer}, {head}) is not in the knockout's layers "
                                            f"{layers}.")
                per_layer[layer].append(check_heads(model, [head])[0])
            per_layer = {layer: hs for layer, hs in per_layer.items() if hs}
        m = edge_mask(batch.spans, self.src, self.dst, self.allow_empty)

        def make(heads: list[int] | None) -> HookFn:
            def fn(scores: Tensor, state: ForwardState) -> Tensor:
                return mask_scores(scores, m, heads)
            return fn

        return [(f"blocks.{layer}.attn.hook_attn_scores", make(hs)) for layer, hs in per_layer.items()]


@contextmanager
def knockout(model: HookedMLLM, spans_or_batch: Spans | MLLMBatch, src: GroupSpec, dst: GroupSpec,
             layers: Sequence[int] | int, heads: Sequence[tuple[int, int]] | None = None,
             allow_empty: bool = False) -> Iterator[HookedMLLM]:
    """Context manager: every forward inside runs with ``src ↛ dst`` knocked out at ``layers``.

    Example::

        with knockout(model, batch, src="image", dst="instruction", layers=range(0, 2)):
            cut = following_scores(model, batch)
    """
    batch = _as_batch(spans_or_batch)
    with apply(model, batch, Knockout(src, dst, layers, heads, allow_empty)):
        yield model


def knockout_hooks(model: HookedMLLM, spans: Spans | MLLMBatch, src: GroupSpec, dst: GroupSpec,
                   layers: Sequence[int] | int, heads: Sequence[tuple[int, int]] | None = None,
                   allow_empty: bool = False) -> list[tuple[str, Any]]:
    """TransformerLens forward hooks of :class:`Knockout` (for ``model.hooks(...)`` / ``run_with_hooks``)."""
    from .base import config_hooks

    return config_hooks(model, _as_batch(spans), [Knockout(src, dst, layers, heads, allow_empty)])


def _as_batch(spans_or_batch: Spans | MLLMBatch) -> MLLMBatch:
    """A batch, or a stand-in carrying only spans (interventions built from spans read nothing else)."""
    if isinstance(spans_or_batch, MLLMBatch):
        return spans_or_batch
    if not isinstance(spans_or_batch, Spans):
        raise TypeError(f"Expected an MLLMBatch or Spans, got {type(spans_or_batch).__name__}.")
    s = spans_or_batch
    dummy = torch.zeros(s.batch_size, s.seq_len, dtype=torch.long)
    return MLLMBatch(tokens=dummy - 1, attention_mask=torch.ones_like(dummy), spans=s)
