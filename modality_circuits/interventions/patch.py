"""Activation patching as an intervention: overwrite an activation with another run's values at a site.

A :class:`Patch` writes ``source`` (the same activation recorded on another prompt, in prompt coordinates) where
``site`` is True, and — when ``fallback`` is given — ``fallback`` everywhere else (path patching's "freeze").
Site kinds, by the activation's layout:

==========  ===================================  ==========================
kind        activation                           site mask
==========  ===================================  ==========================
``pos``     ``[batch, pos, …]`` (resid, outs)     ``Bool[batch, pos]``
``head``    ``[batch, pos, head, d_head]`` (z,q…)  ``Bool[batch, pos, head]``
``pattern`` ``[batch, head, q_pos, k_pos]``        ``Bool[batch, head, q_pos]``
``image``   ``[img_tok, d_model]`` (image embeds)  ``Bool[batch, pos]`` (image positions)
==========  ===================================  ==========================

Positions beyond the prompt (answer continuations) are never patched. Patches of ``hook_image_embeds`` need a
forward from the tokens (``needs_embedding``); every other patch starts at its layer and first position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, no_type_check

import torch
from torch import Tensor

from ..errors import InterventionError
from ..models.forward_state import ForwardState
from ..prompts import MLLMBatch
from .base import HookFn, Intervention
from .core import align_rows

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

SITE_KINDS = ("pos", "head", "pattern", "image")


def site_first_position(site: Tensor, kind: str) -> int:
    """First prompt position a site mask touches (the sequence length if empty)."""
    if kind == "pattern":
        pos = site.any(0).any(0) if site.dim() == 3 else site.any(0)
    else:
        pos = site.reshape(site.shape[0], site.shape[1], -1).any(-1).any(0)
    idx = pos.nonzero().flatten()
    return int(idx[0]) if len(idx) else int(pos.shape[0])


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Write ``source`` at ``site`` of activation ``hook_name`` (and ``fallback`` elsewhere, if given).

    Attributes:
        hook_name: a TransformerLens hook name (``blocks.3.hook_resid_pre``, ``blocks.2.attn.hook_z`` …) or
            ``hook_image_embeds``.
        site: the site mask in prompt coordinates (module table), one row per prompt.
        source: the activation to write, recorded on the other prompt (prompt coordinates, one row per prompt).
        kind: ``pos``, ``head``, ``pattern`` or ``image``.
        fallback: values for everywhere outside the site (None: leave the activation as it is).
    """

    hook_name: str
    site: Tensor
    source: Tensor
    kind: str = "pos"
    fallback: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise InterventionError(f"Patch kind must be one of {SITE_KINDS}; got {self.kind!r}.")

    @property
    def needs_embedding(self) -> bool:
        """Whether the patched activation exists only in a forward from the tokens (image features)."""
        return self.kind == "image"

    def first_layer(self, model: HookedMLLM) -> int:
        m = re.match(r"blocks\.(\d+)\.", self.hook_name)
        return int(m.group(1)) if m else 0

    def first_position(self, batch: MLLMBatch) -> int:
        return site_first_position(self.site, self.kind)

    def hooks(self, model: HookedMLLM, batch: MLLMBatch) -> list[tuple[str, HookFn]]:
        if self.hook_name not in model.hook_dict:
            raise InterventionError(f"Unknown hook {self.hook_name!r}; see model.hook_dict for the names.")
        if self.site.shape[0] != len(batch):
            raise InterventionError(f"A patch site with {self.site.shape[0]} rows for a batch of {len(batch)}.")
        image_mask = (batch.tokens == model.image_encoder.image_token_id) if self.kind == "image" else None
        return [(self.hook_name, _writer(self.kind, self.site, self.source, batch.seq_len, self.fallback,
                                         image_mask))]


def _writer(kind: str, mask: Tensor, src: Tensor, prompt_len: int, fallback: Tensor | None,
            image_mask: Tensor | None) -> HookFn:
    """The hook function of one copy: ``mask``/``src``/``fallback`` have the batch's rows."""

    def fn(act: Tensor, state: ForwardState) -> Tensor:
        off = state.offset
        if off >= prompt_len:  # answer continuations: no prompt position here
            return act
        if kind == "image":
            sel = mask[image_mask.to(mask.device)]  # [img_tok] in masked_scatter order (row-major)
            if sel.shape[0] != act.shape[0]:
                raise InterventionError(f"Image patch met {act.shape[0]} image-token features, expected "
                                        f"{sel.shape[0]}; the clean and corrupted image groups must align.")
            s = src.to(act.device, act.dtype)
            other = act if fallback is None else fallback.to(act.device, act.dtype)
            return torch.where(sel[:, None].to(act.device), s, other)
        n = act.shape[0]
        pdim = 2 if kind == "pattern" else 1
        q = act.shape[pdim]
        m = align_rows(mask.to(act.device), n).narrow(pdim, off, q)
        if fallback is None:  # sparse write (in place, as TransformerLens's patch setters do)
            idx = m.nonzero(as_tuple=True)
            if not len(idx[0]):
                return act
            rows = idx[0] % src.shape[0]
            sidx = (rows, idx[1] + off, *idx[2:]) if kind != "pattern" else (rows, idx[1], idx[2] + off)
            vals = src[sidx].to(act.device, act.dtype)
            act = act.clone()
            act[idx] = vals[..., :act.shape[3]] if kind == "pattern" else vals
            return act
        s = align_rows(src.to(act.device), n).narrow(pdim, off, q)
        other = align_rows(fallback.to(act.device), n).narrow(pdim, off, q)
        if kind == "pattern":
            s, other = s[..., :act.shape[3]], other[..., :act.shape[3]]
        m = m.reshape(m.shape + (1,) * (act.dim() - m.dim()))
        return torch.where(m, s.to(act.dtype), other.to(act.dtype))

    return fn


__all__ = ["SITE_KINDS", "Patch", "site_first_position"]
