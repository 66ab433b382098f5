"""Head interventions as one formula: a per-head scale on the head's output ``z`` around a baseline.

``z' = baseline + α · (z − baseline)`` at the chosen ``(layer, head)`` pairs and positions (:class:`ScaleHeads`):

* **zero ablation** (block): ``α = 0``, baseline 0;
* **mean ablation**: ``α = 0``, baseline = the head's mean ``z`` over a reference set (:func:`mean_z`);
* **amplification**: ``α > 1``, baseline 0 (``α = 1`` is the identity).

:class:`ScaleAttention` instead scales heads' attention from query group ``dst`` to key group ``src`` by ``α``
before renormalisation (adds ``log α`` to those pre-softmax scores).

Heads are always ``(layer, head)`` pairs; positions are a :data:`~modality_circuits.spans.GroupSpec` or None
(every position, answer continuations included). The context managers :func:`block_heads`,
:func:`amplify_heads` and :func:`amplify_attention` are thin forms of the two dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from torch import Tensor

from .._types import Float
from ..errors import InterventionError
from ..models.forward_state import ForwardState
from ..prompts import MLLMBatch
from ..spans import GroupSpec, check_group_spec
from .base import HookFn, Intervention, apply, config_hooks
from .core import align_mask, align_positions, check_heads, check_layers, first_query_seeing
from .knockout import edge_mask

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

HeadSet = Iterable[tuple[int, int]]


def as_head_pairs(heads: Any) -> tuple[tuple[int, int], ...]:
    """``[(layer, head), …]`` as a tuple of int pairs; a clear error for anything else (e.g. a bare int list)."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise InterventionError(f"Heads are a list of (layer, head) pairs; got {heads!r}.")
    out = []
    for lh in heads:
        if isinstance(lh, (str, bytes)) or not isinstance(lh, Iterable) or len(tuple(lh)) != 2:
            raise InterventionError(f"Heads are (layer, head) pairs; got {lh!r}.")
        out.append((int(tuple(lh)[0]), int(tuple(lh)[1])))
    return tuple(out)


def normalize_heads(model: HookedMLLM, heads: HeadSet) -> dict[int, list[int]]:
    """``[(layer, head), …]`` -> ``{layer: [heads]}`` with range checks (clear error on bad indices)."""
    out: dict[int, list[int]] = {}
    for layer, head in as_head_pairs(heads):
        layer = check_layers(model, [layer])[0]
        check_heads(model, [head])
        out.setdefault(layer, []).append(head)
    return out


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)) or alpha < 0:
        raise InterventionError(f"Scale α must be a finite number >= 0 (0 = ablate, 1 = identity, >1 = amplify); "
                                f"got {alpha!r}.")
    return float(alpha)


@torch.no_grad()
def mean_z(model: HookedMLLM, reference: MLLMBatch | Sequence[Any], batch_size: int = 16
           ) -> Float[Tensor, "layer n_heads d_head"]:
    """Mean of each head's ``z`` over the non-padding positions of a reference batch or sample set (the mean
    ablation baseline; every analysis uses this one definition)."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    batches = [reference] if isinstance(reference, MLLMBatch) else [
        model.prepare(list(reference[i:i + batch_size])) for i in range(0, len(reference), batch_size)]
    total, count = None, 0
    for b in batches:
        _, cache = model.run_with_cache(b, names_filter=lambda n: n in names, return_type=None)
        m = b.attention_mask.bool().to(model.cfg.device)
        s = torch.stack([cache[n][m].double().sum(0) for n in names])  # [layer, n_heads, d_head]
        total = s if total is None else total + s
        count += int(m.sum())
    if total is None or count == 0:
        raise InterventionError("Mean ablation needs a non-empty reference set.")
    return (total / count).to(model.cfg.dtype)


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
@dataclass(frozen=True, eq=False)
class ScaleHeads(Intervention):
    """``z' = baseline + alpha · (z − baseline)`` for ``heads`` at ``positions`` (module doc).

    Attributes:
        heads: ``(layer, head)`` pairs.
        alpha: the scale (0 ablates, 1 is the identity, > 1 amplifies); ``scales`` overrides it per head.
        positions: token group to act at (None: every position).
        baseline: ``[layer, n_heads, d_head]`` mean-ablation baseline (None: 0).
    """

    heads: HeadSet
    alpha: float = 0.0
    positions: GroupSpec | None = None
    baseline: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", as_head_pairs(self.heads))
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))
        if self.positions is not None:
            object.__setattr__(self, "positions", check_group_spec(self.positions, "head positions"))

    def first_layer(self, model: HookedMLLM) -> int:
        return min(normalize_heads(model, self.heads), default=model.cfg.n_layers)

    def first_position(self, batch: MLLMBatch) -> int:
        return 0 if self.positions is None else batch.spans.first(self.positions)

    def hooks(self, model: HookedMLLM, batch: MLLMBatch | None) -> list[tuple[str, HookFn]]:
        by_layer = normalize_heads(model, self.heads)
        if isinstance(self.positions, Tensor) and batch is None:
            pos = self.positions  # an explicit mask in prompt coordinates
        elif self.positions is not None and batch is None:
            raise InterventionError("Heads scaled at a token group need the batch the group belongs to.")
        else:
            pos = None if self.positions is None else batch.spans.resolve(self.positions, allow_empty=True)
        if self.baseline is not None and tuple(self.baseline.shape) != (model.cfg.n_layers, model.cfg.n_heads,
                                                                        model.cfg.d_head):
            want = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
            raise InterventionError(f"baseline has shape {tuple(self.baseline.shape)}, expected {want} "
                                    "(layer, n_heads, d_head).")
        out = []
        for layer, hs in by_layer.items():
            s = torch.ones(model.cfg.n_heads)
            s[hs] = self.alpha
            base = None if self.baseline is None else self.baseline[layer]
            out.append((f"blocks.{layer}.attn.hook_z", _scale_z(s, pos, base)))
        return out


def _scale_z(s: Tensor, pos: Tensor | None, base: Tensor | None) -> HookFn:
    def fn(z: Tensor, state: ForwardState) -> Tensor:  # z: [rows, pos, n_heads, d_head]
        sc = s.to(z.device, z.dtype)[None, None, :, None]
        if pos is not None:
            p = align_positions(pos.to(z.device), z.shape[0], z.shape[1], state.offset)
            sc = torch.where(p[:, :, None, None], sc, torch.ones_like(sc))
        b = 0 if base is None else base.to(z.device, z.dtype)[None, None]
        return b + sc * (z - b)
    return fn


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
@dataclass(frozen=True, eq=False)
class ScaleAttention(Intervention):
    """Scale ``heads``' attention from ``dst`` queries to ``src`` keys by ``alpha > 0`` (renormalised)."""

    heads: HeadSet
    alpha: float
    src: GroupSpec
    dst: GroupSpec = "last"

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", as_head_pairs(self.heads))
        if _check_alpha(self.alpha) == 0:
            raise InterventionError("Attention scaling needs α > 0 (use Knockout to remove attention).")
        object.__setattr__(self, "src", check_group_spec(self.src, "attention source"))
        object.__setattr__(self, "dst", check_group_spec(self.dst, "attention destination"))

    def first_layer(self, model: HookedMLLM) -> int:
        return min(normalize_heads(model, self.heads), default=model.cfg.n_layers)

    def first_position(self, batch: MLLMBatch) -> int:
        return first_query_seeing(batch.spans, self.src, self.dst)

    def hooks(self, model: HookedMLLM, batch: MLLMBatch) -> list[tuple[str, HookFn]]:
        m = edge_mask(batch.spans, self.src, self.dst)
        add = math.log(self.alpha)
        out = []
        for layer, hs in normalize_heads(model, self.heads).items():
            sel = torch.zeros(model.cfg.n_heads, dtype=torch.bool)
            sel[hs] = True
            out.append((f"blocks.{layer}.attn.hook_attn_scores", _add_scores(m, sel, add)))
        return out


def _add_scores(m: Tensor, sel: Tensor, add: float) -> HookFn:
    def fn(scores: Tensor, state: ForwardState) -> Tensor:
        n, H, q, k = scores.shape
        mm = align_mask(m.to(scores.device), n, q, k)[:, None] & sel.to(scores.device)[None, :, None, None]
        return scores + mm.to(scores.dtype) * add
    return fn


# ------------------------------------------------------------------------------------------ thin forms
def head_scale_hooks(model: HookedMLLM, heads: HeadSet, alpha: float = 0.0, positions: GroupSpec | None = None,
                     baseline: Tensor | None = None, batch: MLLMBatch | None = None) -> list[tuple[str, Any]]:
    """TransformerLens hooks of :class:`ScaleHeads` (``positions`` needs the ``batch``)."""
    return config_hooks(model, batch, [ScaleHeads(heads, alpha, positions, baseline)])


@contextmanager
@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
def block_heads(model: HookedMLLM, heads: HeadSet, mode: str = "zero", reference: Any = None,
                positions: GroupSpec | None = None, batch: MLLMBatch | None = None) -> Iterator[HookedMLLM]:
    """Context manager: zero- or mean-ablate ``heads`` (mean needs a ``reference`` batch or sample list;
    ``positions`` a token group of ``batch``)."""
    if mode not in ("zero", "mean"):
        raise InterventionError(f"Ablation mode must be 'zero' or 'mean', got {mode!r}.")
    if mode == "mean" and reference is None:
        raise InterventionError("Mean ablation needs a reference batch: block_heads(..., mode='mean', reference=b).")
    iv = ScaleHeads(heads, 0.0, positions, mean_z(model, reference) if mode == "mean" else None)
    with apply(model, _batch_for(iv, batch), iv):
        yield model


@contextmanager
@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
def amplify_heads(model: HookedMLLM, heads: HeadSet, alpha: float, positions: GroupSpec | None = None,
                  batch: MLLMBatch | None = None) -> Iterator[HookedMLLM]:
    """Context manager: multiply the output of ``heads`` by ``alpha`` (at ``positions`` of ``batch``)."""
    iv = ScaleHeads(heads, alpha, positions)
    with apply(model, _batch_for(iv, batch), iv):
        yield model


def _batch_for(iv: ScaleHeads, batch: MLLMBatch | None) -> MLLMBatch | None:
    if iv.positions is not None and batch is None and not isinstance(iv.positions, Tensor):
        raise InterventionError(f"Heads scaled at token group {iv.positions!r} need the batch it belongs to: pass "
                                "batch=model.prepare(samples).")
    return batch


def attention_scale_hooks(model: HookedMLLM, batch: MLLMBatch, heads: HeadSet, alpha: float, src: GroupSpec,
                          dst: GroupSpec = "last") -> list[tuple[str, Any]]:
    """TransformerLens hooks of :class:`ScaleAttention`."""
    from .knockout import _as_batch

    return config_hooks(model, _as_batch(batch), [ScaleAttention(heads, alpha, src, dst)])


@contextmanager
@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
def amplify_attention(model: HookedMLLM, batch: MLLMBatch, heads: HeadSet, alpha: float, src: GroupSpec,
                      dst: GroupSpec = "last") -> Iterator[HookedMLLM]:
    """Context manager form of :class:`ScaleAttention` (``batch``: the batch, or its spans)."""
    from .knockout import _as_batch

    with apply(model, _as_batch(batch), ScaleAttention(heads, alpha, src, dst)):
        yield model


__all__ = ["ScaleAttention", "ScaleHeads", "amplify_attention", "amplify_heads", "as_head_pairs",
           "attention_scale_hooks", "block_heads", "head_scale_hooks", "mean_z", "normalize_heads"]
