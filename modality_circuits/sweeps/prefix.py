"""Prefix-cached, batched re-runs: recompute only what an intervention can change.

An intervention that first touches layer ``l0`` and positions from ``p0`` on (e.g. a knockout whose earliest
destination query is at ``p0``, or a head ablation restricted to positions ``>= p0``) leaves every layer
``< l0`` and every position ``< p0`` of the clean run unchanged (attention is causal). So a run of ``C``
configurations over a batch of ``B`` prompts only needs

    residual of layer l0 at positions p0..L-1        (from the clean run, repeated C times)
    keys/values of positions 0..p0-1 for layers >= l0 (from the clean run, as a KV cache)
    keys/values of all positions for layers < l0       (only needed for answer continuations)

and runs ``blocks[l0:]`` on ``C·B`` rows of ``L − p0`` positions in one forward. :class:`CleanRun` holds the
clean activations; :meth:`CleanRun.prompt_pass` builds the suffix run for
:func:`modality_circuits.metrics.answer_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from ..prompts import MLLMBatch


@dataclass
class CleanRun:
    """Clean activations of a batch: ``resid_pre`` of every layer and every layer's keys/values."""

    batch: MLLMBatch
    resid: list[Tensor]  # per layer: [batch, pos, d_model]
    keys: list[Tensor]  # per layer: [batch, pos, n_kv_heads, d_head] (before rotary, as TL caches them)
    values: list[Tensor]
    rope_positions: Tensor | None = None  # adapter rotary positions of the prompt (M-RoPE), if any

    @classmethod
    @torch.no_grad()
    def record(cls, model: Any, batch: MLLMBatch) -> "CleanRun":
        n = model.cfg.n_layers
        want = {f"blocks.{i}.hook_resid_pre" for i in range(n)} | {f"blocks.{i}.attn.hook_k" for i in range(n)} | {
            f"blocks.{i}.attn.hook_v" for i in range(n)}
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in want, return_type=None)
        return cls(batch, [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n)],
                   [cache[f"blocks.{i}.attn.hook_k"] for i in range(n)],
                   [cache[f"blocks.{i}.attn.hook_v"] for i in range(n)], getattr(model, "rope_positions", None))

    def prompt_pass(self, model: Any, l0: int, p0: int, repeats: int, with_cache: bool = True
                    ) -> Callable[[], tuple[Tensor, Any]]:
        """A prompt pass over ``repeats`` copies of the batch that starts at layer ``l0`` and position ``p0``."""
        mask = self.batch.attention_mask.to(model.cfg.device)
        B, L = mask.shape
        p0 = max(0, min(p0, L - 1))

        def rep(t: Tensor) -> Tensor:
            return t.repeat(repeats, *([1] * (t.dim() - 1)))

        def run() -> tuple[Tensor, Any]:
            entries = []
            for layer in range(model.cfg.n_layers):
                upto = p0 if layer >= l0 else L  # layers below l0 never run again: keep all positions
                entries.append(TransformerLensKeyValueCacheEntry(rep(self.keys[layer][:, :upto]),
                                                                 rep(self.values[layer][:, :upto])))
            cache = TransformerLensKeyValueCache(entries, rep(mask[:, :p0]).to(torch.int))
            extra = {} if self.rope_positions is None else {"rope_positions": self.rope_positions}
            logits = model(rep(self.resid[l0][:, p0:]), start_at_layer=l0, attention_mask=rep(mask[:, p0:]),
                           past_kv_cache=cache, **extra)
            return logits, (cache if with_cache else None)

        return run
