"""Attention over a key/value prefix shared by many rows, without copying it (the engine's KV cache).

The engine (:mod:`modality_circuits.engine`) scores ``C`` configurations over a batch of ``B`` prompts as ``R = m·B``
rows (config-major: row ``r`` is prompt ``r mod B``; answer continuations multiply ``m`` again). Every row's keys
and values of the clean prefix (positions ``< p0``) are the clean run's, so TransformerLens's cache, which holds one
copy per row, repeats them ``m`` times, and its attention then copies them again in every call: it concatenates the
new keys, rotates *all* keys, repeats them for grouped-query heads and transposes them for the matmuls. When the
recomputed suffix is short (a knockout into the last position, an answer continuation) those copies are most of the
work.

:class:`SharedPrefixKV` holds the prefix once, ``[B, p, n_kv, d_head]`` (keys already rotated, as the clean run
used them), plus each row's own appended positions; the attention class made by :func:`shared_prefix_class` scores
queries against it by folding the ``m`` copies and the query heads of each key/value head into the query axis of
one batched matmul per (prompt, kv head)::

    q  [R, q, H, d] -> [B, n_kv, m·g·q, d]  @  prefix keys [B, n_kv, d, p]  -> scores of the prefix
    q  [R, q, H, d] -> [R, n_kv, g·q, d]    @  own keys    [R, n_kv, d, s]  -> scores of the row's own positions

(``g = H / n_kv``: query head ``h`` reads key/value head ``h // g``, TransformerLens's ``repeat_interleave``). The
full ``[R, H, q, p + s]`` scores then go through the class's own causal / block / sliding-window mask,
``hook_attn_scores``, softmax and ``hook_pattern`` exactly as in TransformerLens, so knockouts and every hook see the
same tensors; ``hook_z`` and the output projection follow. A hook on ``hook_rot_k`` (which sees all keys) makes the
layer materialise them for that call. Other inputs (TransformerLens caches, no cache) take the inherited forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.utilities.activation_functions import apply_softcap

from .._types import Float
from ..errors import UnsupportedArchitectureError

_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


class SharedPrefixKV:
    """Keys/values of one layer: a prefix shared by rows ``r ≡ i (mod B)`` plus each row's own positions.

    Attributes:
        prefix_k, prefix_v: ``[B, p, n_kv, d_head]``; keys after rotary (and q/k norm).
        own_k, own_v: ``[R, s, n_kv, d_head]`` appended by the forward passes (keys after rotary).
    """

    def __init__(self, prefix_k: Tensor, prefix_v: Tensor, rows: int, own_k: Tensor | None = None,
                 own_v: Tensor | None = None):
        B = prefix_k.shape[0]
        if rows % B:
            raise ValueError(f"{rows} rows are not a whole number of copies of the {B} prompts of the prefix.")
        self.prefix_k, self.prefix_v, self.rows = prefix_k, prefix_v, rows
        empty = prefix_k.new_empty((rows, 0, *prefix_k.shape[2:]))
        self.own_k = empty if own_k is None else own_k
        self.own_v = empty if own_v is None else own_v
        self._kT = prefix_k.permute(0, 2, 3, 1).contiguous() if prefix_k.shape[1] else None  # [B, n_kv, d, p]
        self._v = prefix_v.permute(0, 2, 1, 3).contiguous() if prefix_k.shape[1] else None  # [B, n_kv, p, d]

    @property
    def length(self) -> int:
        """Key positions so far (prefix and own)."""
        return self.prefix_k.shape[1] + self.own_k.shape[1]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add the rows' new (rotated) keys and values ``[R, new, n_kv, d_head]``."""
        self.own_k = torch.cat([self.own_k, k], 1) if self.own_k.shape[1] else k
        self.own_v = torch.cat([self.own_v, v], 1) if self.own_v.shape[1] else v

    def repeat_rows(self, k: int) -> SharedPrefixKV:
        """``k`` copies of every row (row-block-major, as ``Tensor.repeat``); the prefix stays shared."""
        out = SharedPrefixKV.__new__(SharedPrefixKV)
        out.prefix_k, out.prefix_v, out.rows, out._kT, out._v = (self.prefix_k, self.prefix_v, self.rows * k,
                                                                  self._kT, self._v)
        out.own_k, out.own_v = self.own_k.repeat(k, 1, 1, 1), self.own_v.repeat(k, 1, 1, 1)
        return out

    def select_rows(self, index: Tensor) -> SharedPrefixKV:
        """The rows ``index`` (each ``≡ its new position (mod B)``, so the prefix stays shared)."""
        B = self.prefix_k.shape[0]
        if len(index) % B or not torch.equal(index.cpu() % B, torch.arange(len(index)) % B):
            raise ValueError(f"Rows {index.tolist()} do not keep the prefix's {B} prompts in order.")
        out = self.repeat_rows(1)
        out.rows, out.own_k, out.own_v = len(index), self.own_k[index], self.own_v[index]
        return out

    def full(self) -> tuple[Tensor, Tensor]:
        """Every row's keys and values ``[R, p + s, n_kv, d_head]`` (materialised; for hooks that read them)."""
        return self._rows(self.prefix_k, self.own_k), self._rows(self.prefix_v, self.own_v)

    def _dense(self, qn: int, H: int) -> bool:
        """Whether to score against materialised keys: with long query runs, splitting and joining the
        ``[rows, head, q, key]`` scores of prefix and own positions copies more than repeating the prefix does
        (about ``2·H·q`` against ``4·n_kv·d_head`` elements per row and key)."""
        p, s = self.prefix_k.shape[1], self.own_k.shape[1]
        kv, d = self.prefix_k.shape[2:]
        return bool(p and s and qn * H >= 2 * kv * d)

    def _rows(self, prefix: Tensor, own: Tensor) -> Tensor:
        return torch.cat([prefix.repeat(self.rows // prefix.shape[0], 1, 1, 1), own], 1)

    @staticmethod
    def _fold_scores(q: Tensor, k: Tensor) -> Tensor:
        """``q [R, q, H, d]`` against ``k [R, key, n_kv, d]``, query heads folded into the query axis."""
        R, qn, H, d = q.shape
        kv = k.shape[2]
        qo = q.reshape(R, qn, kv, H // kv, d).permute(0, 2, 3, 1, 4).reshape(R, kv, H // kv * qn, d)
        return (qo @ k.permute(0, 2, 3, 1)).view(R, H, qn, k.shape[1])

    @staticmethod
    def _fold_mix(pattern: Tensor, v: Tensor) -> Tensor:
        R, H, qn, n = pattern.shape
        kv, d = v.shape[2:]
        z = pattern.reshape(R, kv, H // kv * qn, n) @ v.permute(0, 2, 1, 3)  # [R, kv, g·q, d]
        return z.view(R, kv, H // kv, qn, d).permute(0, 3, 1, 2, 4).reshape(R, qn, H, d)

    def scores(self, q: Float[Tensor, "rows q head d_head"]) -> Float[Tensor, "rows head q key"]:
        """``q · kᵀ`` against every key position (prefix first), without repeating the prefix."""
        R, qn, H, d = q.shape
        B, p, kv, _ = self.prefix_k.shape
        m, g, s = R // B, H // kv, self.own_k.shape[1]
        if self._dense(qn, H):
            return self._fold_scores(q, self._rows(self.prefix_k, self.own_k))
        parts = []
        if p:
            qf = q.reshape(m, B, qn, kv, g, d).permute(1, 3, 0, 4, 2, 5).reshape(B, kv, m * g * qn, d)
            sp = (qf @ self._kT).view(B, kv, m, g, qn, p)
            parts.append(sp.permute(2, 0, 1, 3, 4, 5).reshape(R, H, qn, p))
        if s:
            parts.append(self._fold_scores(q, self.own_k))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def mix(self, pattern: Float[Tensor, "rows head q key"]) -> Float[Tensor, "rows q head d_head"]:
        """``pattern · v`` over every key position: the attention's ``z``."""
        R, H, qn, _ = pattern.shape
        B, p, kv, d = self.prefix_v.shape
        m, g, s = R // B, H // kv, self.own_v.shape[1]
        if self._dense(qn, H):
            return self._fold_mix(pattern, self._rows(self.prefix_v, self.own_v))
        z = None
        if p:
            pp = pattern[..., :p].reshape(m, B, kv, g, qn, p).permute(1, 2, 0, 3, 4, 5).reshape(B, kv, m * g * qn, p)
            z = (pp @ self._v).view(B, kv, m, g, qn, d).permute(2, 0, 4, 1, 3, 5).reshape(R, qn, H, d)
        if s:
            zo = self._fold_mix(pattern[..., p:], self.own_v)
            z = zo if z is None else z + zo
        assert z is not None, "attention over no key positions"
        return z


def shared_kv_unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s attention cannot read :class:`SharedPrefixKV` caches (None: it can)."""
    c = model.cfg
    if not all(getattr(type(b.attn), "_shared_prefix", False) for b in model.blocks):
        return "its attention modules were not built with the shared-prefix attention"
    flags = {"use_attn_result": c.use_attn_result, "load_in_4bit": c.load_in_4bit,
             "use_logn_attn": getattr(c, "use_logn_attn", False),
             "use_attention_sinks": getattr(c, "use_attention_sinks", False),
             "clip_qkv": getattr(c, "clip_qkv", None) is not None,
             "positional_embedding_type": c.positional_embedding_type not in ("rotary", "standard"),
             "attention_dir": c.attention_dir != "causal",
             "original_architecture": c.original_architecture in _OLMO_QK_NORM}
    bad = [k for k, v in flags.items() if v]
    return f"cfg.{bad[0]} is set to {getattr(c, bad[0])!r}" if bad else None


def _shared_forward(self: Any, query_input: Tensor, key_input: Tensor, value_input: Tensor,
                    past_kv_cache_entry: Any = None, additive_attention_mask: Tensor | None = None,
                    attention_mask: Tensor | None = None, position_bias: Tensor | None = None) -> Tensor:
    entry = past_kv_cache_entry
    if not isinstance(entry, SharedPrefixKV):
        return super(_SHARED[type(self)], self).forward(query_input, key_input, value_input, entry,
                                                        additive_attention_mask, attention_mask, position_bias)
    if additive_attention_mask is not None or position_bias is not None:
        raise UnsupportedArchitectureError("The shared-prefix KV cache supports neither additive attention masks nor "
                                           "position biases; run without the engine's prefix (prefix=False).")
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    offset = entry.length
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.apply_rotary(k, offset, attention_mask)
    entry.append(k, v)
    if self.hook_rot_k._forward_hooks:  # a hook reads every rotated key: materialise them for this call
        k_all, v_all = entry.full()
        scores = self.calculate_attention_scores(q, self.hook_rot_k(k_all))  # [R, H, q, key]
    else:
        scores = apply_softcap(entry.scores(q) / self.attn_scale, self.cfg.attn_scores_soft_cap)
    scores = self.hook_attn_scores(self.apply_causal_mask(scores, offset, attention_mask))
    pattern = F.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = self.hook_pattern(pattern).to(dtype=v.dtype)
    if self.hook_rot_k._forward_hooks:
        z = self.calculate_z_scores(v_all, pattern)  # calls hook_z
    else:
        z = self.hook_z(entry.mix(pattern))  # [R, q, H, d_head]
    w = self.W_O.permute(2, 0, 1).reshape(self.cfg.d_model, -1).contiguous()  # TL: "h d m -> m (h d)"
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w.dtype), w, self.b_O)


def prompt_cache(model: nn.Module, batch: Any) -> tuple[Tensor, Any] | None:
    """One forward of ``batch``: ``(logits [batch, pos, vocab], a KV cache of its positions)`` whose entries are
    :class:`SharedPrefixKV` (rows = the batch), so continuations (answer tokens, generated tokens) append their own
    positions and never copy, rotate or repeat the prompt's again. None where the model cannot read them (then use
    TransformerLens's cache). Hooks active around the call apply to the forward."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    c = model.cfg
    if shared_kv_unsupported(model) is not None or (c.use_qk_norm and c.positional_embedding_type != "rotary"):
        return None
    key = "attn.hook_rot_k" if c.positional_embedding_type == "rotary" else "attn.hook_k"  # as the attention uses them
    want = {f"blocks.{i}.{h}" for i in range(c.n_layers) for h in (key, "attn.hook_v")}
    logits, acts = model.run_with_cache(batch, names_filter=lambda name: name in want)
    rows = logits.shape[0]
    entries = [SharedPrefixKV(acts[f"blocks.{i}.{key}"], acts[f"blocks.{i}.attn.hook_v"], rows)
               for i in range(c.n_layers)]
    return logits, TransformerLensKeyValueCache(entries, batch.attention_mask.to(c.device).to(torch.int))


_SHARED: dict[type, type] = {}


def shared_prefix_class(cls: type) -> type:
    """``cls`` (a TransformerLens attention class, possibly one of this package's subclasses) that also reads
    :class:`SharedPrefixKV` caches. One subclass per class; built modules switch to it."""
    if getattr(cls, "_shared_prefix", False):
        return cls
    if cls not in _SHARED:
        sub = type(f"SharedPrefix{cls.__name__}", (cls,), {"_shared_prefix": True, "forward": _shared_forward,
                                                           "__module__": __name__})
        _SHARED[cls] = sub
        _SHARED[sub] = sub
    return _SHARED[cls]


def install_shared_prefix(model: nn.Module) -> None:
    """Switch every block's attention to its shared-prefix class (called once, when the model is built, after the
    architecture's own attention classes are installed)."""
    for block in model.blocks:
        block.attn.__class__ = shared_prefix_class(type(block.attn))


__all__ = ["SharedPrefixKV", "install_shared_prefix", "prompt_cache", "shared_kv_unsupported", "shared_prefix_class"]
