"""The one prefix-cached engine: record the clean run once, then score any stack of interventions by recomputing
only what they can change.

An intervention that first touches layer ``l0`` at positions ``≥ p0`` leaves every layer ``< l0`` and every
position ``< p0`` of the clean run unchanged (attention is causal; with bidirectional image blocks, Gemma 3, ``p0``
moves back to the start of a block it would split: :meth:`HookedMLLM.prefix_boundary`). So ``C`` configurations
over a batch of ``B``
prompts (length ``L``) need only::

    residual entering layer l0 at positions p0 … L-1     (clean run, repeated C times, config-major)
    keys/values of positions 0 … p0-1 for layers ≥ l0      (clean run, as a KV cache)
    keys/values of every position for layers < l0          (only read by answer continuations)

and run ``blocks[l0:]`` on ``C·B`` rows of ``L − p0`` positions in one forward (:meth:`CleanRun.suffix_pass`).
When the metric reads only the last position (:attr:`Metric.reads_last_only`), the final block runs attention and
MLP at the last position only and just keys/values elsewhere. :func:`run` is the whole API::

    clean = CleanRun.record(model, batch)
    values = run(model, clean, [Knockout("image", "last", [3]), ScaleHeads([(2, 1)], 0.0)], "p_binary")  # [C, B]

Knockout sweeps, head scans, blocking/amplification and patching are thin table-building wrappers over it. The
rotary positions (M-RoPE) and attention blocks travel with the clean run's batch
(:meth:`HookedMLLM.prompt_context`); nothing is read from an earlier forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from ._types import Float
from .errors import UnsupportedArchitectureError
from .interventions.base import Config, apply_stack, as_config, first_layer, first_position
from .metrics import MetricLike, PromptPass, as_metric
from .models.forward_state import ForwardState, forward_scope
from .models.shared_kv import SharedPrefixKV, shared_kv_unsupported
from .prompts import MLLMBatch

if TYPE_CHECKING:
    from .models.hooked_mllm import HookedMLLM


@dataclass
class CleanRun:
    """Clean activations of a batch: ``resid_pre`` and keys/values of every layer (and, optionally, the logits).

    Attributes:
        batch: the batch (carries spans, samples and rotary positions).
        resid: per layer, ``Float[Tensor, "batch pos d_model"]``.
        keys, values: per layer, ``[batch, pos, n_kv_heads, d_head]`` (after any q/k norm and before rotary, as
            TransformerLens caches them).
        logits: ``[batch, pos, vocab]`` when recorded with ``keep_logits`` (metrics on full-length logits).
        shared: suffix passes read the prefix from shared-prefix caches (:class:`SharedPrefixKV`: one copy for all
            configurations) instead of one TransformerLens cache row per configuration.
        rotated: ``keys`` are after rotary (``hook_rot_k``), as shared-prefix caches hold them.
    """

    batch: MLLMBatch
    resid: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    logits: Tensor | None = None
    shared: bool = False
    rotated: bool = False

    @classmethod
    @torch.no_grad()
    def record(cls, model: HookedMLLM, batch: MLLMBatch, keep_logits: bool = False) -> CleanRun:
        """One forward of ``batch`` (hooks active around the call apply: the "clean" run is what they make it).

        Models whose attention reads shared-prefix caches (:mod:`~modality_circuits.models.shared_kv`) keep the
        keys after rotary (``hook_rot_k``), as the attention used them; others keep TransformerLens's cache layout.
        """
        n = model.cfg.n_layers
        shared = shared_kv_unsupported(model) is None
        rotated = shared and model.cfg.positional_embedding_type == "rotary"
        key_hook = "attn.hook_rot_k" if rotated else "attn.hook_k"
        want = {f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", key_hook, "attn.hook_v")}
        normed: dict[int, Tensor] = {}  # q/k-norm models cache keys after the norm (hook_k is before it)
        handles = [model.blocks[i].attn.k_norm.register_forward_hook(
            lambda mod, inp, out, i=i: normed.__setitem__(i, out.detach())) for i in range(n)
            if model.cfg.use_qk_norm and not rotated]
        try:
            logits, cache = model.run_with_cache(batch, names_filter=lambda name: name in want,
                                                 return_type="logits" if keep_logits else None)
        finally:
            for h in handles:
                h.remove()
        keys = [cache[f"blocks.{i}.{key_hook}"] for i in range(n)]
        keys = [normed[i].reshape(k.shape) if i in normed else k for i, k in enumerate(keys)]
        return cls(batch, [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n)], keys,
                   [cache[f"blocks.{i}.attn.hook_v"] for i in range(n)], logits, shared=shared, rotated=rotated)

    def suffix_pass(self, model: HookedMLLM, l0: int, p0: int, copies: int, with_cache: bool = True,
                    stop_at_layer: int | None = None, last_only: bool = False) -> PromptPass:
        """A prompt pass over ``copies`` config-major copies of the batch from layer ``l0`` and position ``p0``.

        The pass returns ``(output of positions p0 …, KV cache of every prompt position or None)``; the output is
        the logits, or the residual entering ``stop_at_layer``. ``last_only`` (metrics that read only the last
        position): the final block computes attention and MLP at the last position only (output
        ``[rows, 1, vocab]``) and just keys/values elsewhere, which the answer continuations read.
        """
        mask = self.batch.attention_mask.to(model.cfg.device)
        L, n = mask.shape[1], model.cfg.n_layers
        l0 = max(0, min(int(l0), n - 1))
        p0 = max(0, min(int(p0), L - 1))
        ctx = model.prompt_context(self.batch)  # rotary positions, attention blocks
        split = last_only and stop_at_layer is None and p0 < L - 1 and can_split_last_block(model)
        why = shared_kv_unsupported(model) if self.shared else "not recorded for it"
        if self.rotated and why is not None:
            raise UnsupportedArchitectureError(f"This clean run holds rotated keys for shared-prefix caches, but the "
                                               f"model no longer reads them ({why}): record the clean run again.")
        shared = why is None

        def rep(t: Tensor) -> Tensor:
            return t.repeat(copies, *([1] * (t.dim() - 1)))

        def run() -> tuple[Tensor, Any]:
            if p0 == 0 and not with_cache and not split:
                return model(rep(self.resid[l0]), start_at_layer=l0, stop_at_layer=stop_at_layer,
                             attention_mask=rep(mask), **ctx), None
            entries: list[Any] = []
            for layer in range(n):
                upto = p0 if layer >= l0 else L  # layers below l0 never run again: keep every position
                k, v = self.keys[layer][:, :upto], self.values[layer][:, :upto]
                entries.append(SharedPrefixKV(k, v, copies * len(mask)) if shared
                               else TransformerLensKeyValueCacheEntry(rep(k), rep(v)))
            cache = TransformerLensKeyValueCache(entries, rep(mask[:, :p0]).to(torch.int))
            if shared:  # answer continuations may share their layers below l0 across copies (metrics.py)
                cache.start_layer, cache.copies = l0, copies
            if not split:
                out = model(rep(self.resid[l0][:, p0:]), start_at_layer=l0, stop_at_layer=stop_at_layer,
                            attention_mask=rep(mask[:, p0:]), past_kv_cache=cache, **ctx)
                return out, (cache if with_cache else None)
            if l0 < n - 1:  # layers l0 … n-2 on positions p0 …: the final block's input
                x = model(rep(self.resid[l0][:, p0:]), start_at_layer=l0, stop_at_layer=n - 1,
                          attention_mask=rep(mask[:, p0:]), past_kv_cache=cache, **ctx)
            else:
                x = rep(self.resid[n - 1][:, p0:])
            blk = model.blocks[n - 1]
            with forward_scope(ForwardState(offset=p0, **ctx)):  # keys/values of p0 … L-2
                h = blk.ln1(blk.hook_resid_pre(x[:, :-1]))
                _, kk, vv = blk.attn.calculate_qkv_matrices(h, h, h)
                if shared and self.rotated:  # shared caches hold keys after rotary
                    kk = blk.attn.apply_rotary(kk, p0, rep(mask[:, :L - 1]))
            cache.entries[n - 1].append(kk, vv)
            cache.previous_attention_mask = rep(mask[:, :L - 1]).to(torch.int)
            out = model(x[:, -1:], start_at_layer=n - 1, attention_mask=rep(mask[:, L - 1:]), past_kv_cache=cache,
                        **ctx)
            return out, (cache if with_cache else None)

        return run


_QK_NORM_ARCHS = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def can_split_last_block(model: HookedMLLM) -> bool:
    """Whether the final block is a plain pre-norm block (``resid_pre → ln1 → attention → MLP``) whose keys and
    values may be computed on their own (``last_only``)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    c = model.cfg
    return not (c.use_attn_in or c.use_split_qkv_input or c.parallel_attn_mlp or c.attn_only
                or c.positional_embedding_type == "shortformer" or getattr(c, "clip_qkv", None) is not None
                or c.original_architecture in POST_NORM_ARCHITECTURES or c.original_architecture in _QK_NORM_ARCHS)


@torch.no_grad()
def run(model: HookedMLLM, clean: CleanRun, configs: Sequence[Config], metric: MetricLike = "p_binary", *,
        prefix: bool = True) -> Float[Tensor, "config batch *rest"]:
    """Score ``configs`` side by side in one forward that recomputes only what they can change.

    Args:
        clean: the recorded clean run of the batch (:meth:`CleanRun.record`).
        configs: one entry per configuration: an intervention, or a tuple of interventions applied together;
            ``()`` is the unchanged run.
        metric: a :class:`~modality_circuits.metrics.Metric`, a name from ``metrics.METRICS`` or a callable on
            logits.
        prefix: start at the configurations' first layer and position (False: every row from layer 0 of the clean
            residual, the reference the tests compare against).

    Returns:
        ``Float[Tensor, "config batch"]``: the metric of every configuration on every sample.
    """
    met = as_metric(metric)
    batch = clean.batch
    configs = list(configs)
    C = len(configs)
    l0 = first_layer(model, configs) if prefix else 0
    p0 = model.prefix_boundary(batch, first_position(batch, configs)) if prefix else 0
    if l0 >= model.cfg.n_layers or p0 >= batch.seq_len:  # nothing changes: the clean run's last block is enough
        l0, p0 = model.cfg.n_layers - 1, batch.seq_len - 1
    with_cache = met.needs_cache(model, batch)
    if any(getattr(iv, "needs_embedding", False) for c in configs for iv in as_config(c)):
        pass_ = embedding_pass(model, batch, C, with_cache)  # e.g. patched image features: from the tokens
    else:
        pass_ = clean.suffix_pass(model, l0, p0, C, with_cache=with_cache, last_only=met.reads_last_only and prefix)
    with apply_stack(model, batch, configs):
        out = met(model, batch, prompt_pass=pass_, copies=C, clean_logits=clean.logits)
    return out.float().cpu()


def embedding_pass(model: HookedMLLM, batch: MLLMBatch, copies: int, with_cache: bool) -> PromptPass:
    """A full prompt pass over ``copies`` config-major copies of ``batch`` from the tokens (vision tower included)."""
    rep = batch.repeat(copies)

    def run_() -> tuple[Tensor, Any]:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(rep)) if with_cache else None
        return model(rep, past_kv_cache=cache), cache

    return run_


def baseline(model: HookedMLLM, clean: CleanRun, metric: MetricLike = "p_binary") -> Float[Tensor, " batch *rest"]:
    """The metric of the clean run itself (only the last position of the final block is recomputed)."""
    return run(model, clean, [()], metric)[0]


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive chunks of at most ``size`` items (at least one per chunk)."""
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


__all__ = ["CleanRun", "baseline", "can_split_last_block", "chunked", "run"]
