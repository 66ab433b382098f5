"""Shared machinery of interventions: mask alignment and hook application inside context managers.

Interventions (:mod:`~modality_circuits.interventions.base`) build their hooks from span masks in prompt
coordinates; these helpers fit such masks to the activations a hook meets.

**Alignment rule.** A mask built for a batch of ``B`` prompts of length ``L`` may meet activations of a
*repeated* batch (``k*B`` rows, config-major, e.g. answer continuations or batched sweeps) and of *shifted*
queries (``q_len < k_len`` when a KV cache holds the first ``k_len − q_len`` positions). :func:`align_mask`
repeats rows and takes the last ``q_len`` query positions; positions beyond the prompt belong to no group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._types import Bool
from ..errors import InterventionError

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM
    from ..spans import GroupSpec, Spans


def align_rows(t: Tensor, n_rows: int) -> Tensor:
    """Repeat ``t`` along dim 0 to ``n_rows`` rows (config-major); error if not a multiple."""
    if t.shape[0] == n_rows:
        return t
    if n_rows % t.shape[0]:
        raise InterventionError(f"An intervention built for {t.shape[0]} prompts met {n_rows} rows; build it from "
                                "the batch you run (or a batch it repeats).")
    return t.repeat(n_rows // t.shape[0], *([1] * (t.dim() - 1)))


def align_pos(m: Tensor, length: int, dim: int = 1, offset_from_end: bool = True) -> Tensor:
    """Pad ``m`` with False up to ``length`` along ``dim`` (positions beyond the prompt are in no group)."""
    if m.shape[dim] >= length:
        return m
    pad_shape = list(m.shape)
    pad_shape[dim] = length - m.shape[dim]
    return torch.cat([m, torch.zeros(pad_shape, dtype=m.dtype, device=m.device)], dim=dim)


def align_mask(mask: Bool[Tensor, "b q k"] | Bool[Tensor, "b h q k"], n_rows: int, q_len: int, k_len: int
               ) -> Tensor:
    """Fit a ``[b, (h,) L, L]`` score mask to scores of shape ``[n_rows, h, q_len, k_len]``.

    Query ``i`` of the scores is absolute position ``k_len − q_len + i`` (KV-cache convention).
    """
    m = align_rows(mask, n_rows)
    qd, kd = m.dim() - 2, m.dim() - 1
    m = align_pos(align_pos(m, k_len, qd), k_len, kd)
    m = m.narrow(qd, k_len - q_len, q_len).narrow(kd, 0, k_len)
    return m


def align_positions(mask: Tensor, n_rows: int, q_len: int, offset: int = 0) -> Tensor:
    """Fit a ``[b, L, ...]`` position mask to activations covering absolute positions ``offset..offset+q_len``."""
    m = align_rows(mask, n_rows)
    m = align_pos(m, offset + q_len, dim=1)
    return m.narrow(1, offset, q_len)


def first_query_seeing(spans: Spans, src: GroupSpec, dst: GroupSpec) -> int:
    """The first position of a ``dst`` query that can attend to a ``src`` key, over the batch (``seq_len`` if none
    can): where an edit of ``dst → src`` attention (knockout, scaling) can first change anything.

    Attention is causal, so a query before its row's first ``src`` key has nothing to change; bidirectional
    image blocks (Gemma 3) are the one exception, so where ``src`` holds image tokens the row's first image token
    is the bound instead. A destination spread over the prompt (a random stand-in) thus starts the engine's
    recomputation at its first query after the source, not at its first position.
    """
    s = spans.resolve(src, allow_empty=True)  # [batch, pos]
    d = spans.resolve(dst, allow_empty=True)  # [batch, pos]
    n = spans.seq_len
    start = torch.where(s.any(1), s.int().argmax(1), n)  # [batch]: first source key (argmax: first True)
    if "image" in spans:
        img = spans.mask("image", allow_empty=True)
        start = torch.where((s & img).any(1), img.int().argmax(1), start)
    hit = (d & (torch.arange(n, device=d.device)[None, :] >= start[:, None])).any(0).nonzero().flatten()
    return int(hit[0]) if len(hit) else n


def check_layers(model: HookedMLLM, layers: Sequence[int] | int) -> list[int]:
    """Normalise layers (negative indexing allowed) and check the range."""
    n = model.cfg.n_layers
    layers = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in layers:
        if not -n <= int(layer) < n:
            raise InterventionError(f"Layer {layer} is out of range: the model has {n} layers (0..{n - 1}).")
        out.append(int(layer) % n)
    return sorted(set(out))


def check_heads(model: HookedMLLM, heads: Sequence[int] | None) -> list[int] | None:
    if heads is None:
        return None
    H = model.cfg.n_heads
    bad = [h for h in heads if not 0 <= int(h) < H]
    if bad:
        raise InterventionError(f"Head index {bad} out of range: layers have {H} heads (0..{H - 1}).")
    return [int(h) for h in heads]


def layer_window(layer: int, k: int, n_layers: int, mode: str = "centered") -> list[int]:
    """Layers of a window of ``k`` layers at ``layer``: ``centered`` on it or ``start``-ing at it (clipped)."""
    if k < 1:
        raise InterventionError(f"Window size must be >= 1, got {k}.")
    if mode == "centered":
        lo = layer - (k - 1) // 2
    elif mode == "start":
        lo = layer
    else:
        raise InterventionError(f"Window mode must be 'centered' or 'start', got {mode!r}.")
    return [x for x in range(lo, lo + k) if 0 <= x < n_layers]
