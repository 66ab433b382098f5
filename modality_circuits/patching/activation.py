"""Activation patching over layers, positions, token groups and heads, batched over patch targets.

Technique (Meng et al. 2022; TransformerLens ``patching.py``): run the model on one prompt of a
:class:`~modality_circuits.patching.pairs.PatchPair` and overwrite one activation with its value from the other
prompt's run, then measure how far the output moves.

* ``direction="denoise"`` (default): run the **corrupted** prompt and patch in **clean** activations; a score
  near 1 means this activation alone restores the clean behaviour (it carries the difference).
* ``direction="noise"``: run the **clean** prompt and patch in **corrupted** activations; a score near 0 means
  this activation is necessary for the clean behaviour.

Scores are normalised so that the corrupted run is 0 and the clean run is 1 in both directions (see
:mod:`~modality_circuits.patching.engine` for the metrics). One generic function, :func:`activation_patch`, and
thin named versions with TransformerLens's shapes:

================================  ======================================================================
function                          result shape per ``by``
================================  ======================================================================
``patch_resid_pre/mid/post``,      ``pos``: ``[layer, pos]``; ``group``: ``[layer, group]``;
``patch_attn_out/mlp_out``         ``layer``: ``[layer]`` (all positions)
``patch_head_out`` (``z``),        ``head``: ``[layer, head]`` (all positions); ``pos``: ``[layer, pos, head]``;
``patch_head_q/k/v``               ``group``: ``[layer, group, head]``; ``layer``: ``[layer]`` (all heads)
``patch_head_pattern``             ``head``: ``[layer, head]``; ``pos``: ``[layer, head, dest_pos]``;
                                   ``group``: ``[layer, head, dest_group]``
``patch_image_embeds``             ``layer``: ``[]`` (all image tokens); ``pos``: ``[pos]``; ``group``: ``[group]``
================================  ======================================================================

``k``/``v`` heads are key/value heads (``n_key_value_heads`` of them under grouped-query attention). Positions
are padded positions (the same in both prompts of an aligned pair); a group is patched at all its positions at
once. Patch targets run ``max_rows // batch`` at a time in one forward, starting at the chunk's first patched
layer and position from the base run's cache (prefix reuse; ``prefix_reuse=False`` runs every forward from the
embeddings, as TransformerLens does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..engine import CleanRun, run
from ..errors import InterventionError, NumericalError
from ..interventions.core import check_heads, check_layers
from ..interventions.patch import Patch, site_first_position
from ..metrics import MetricLike
from .engine import (
    PairMetric,
    PatchResult,
    base_and_source,
    chunks,
    normalise,
    position_groups,
    position_labels,
)
from .pairs import PatchPair

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

#: component -> (hook name template, site kind)
COMPONENTS: dict[str, tuple[str, str]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", "pos"),
    "resid_mid": ("blocks.{}.hook_resid_mid", "pos"),
    "resid_post": ("blocks.{}.hook_resid_post", "pos"),
    "attn_out": ("blocks.{}.hook_attn_out", "pos"),
    "mlp_out": ("blocks.{}.hook_mlp_out", "pos"),
    "z": ("blocks.{}.attn.hook_z", "head"),
    "q": ("blocks.{}.attn.hook_q", "head"),
    "k": ("blocks.{}.attn.hook_k", "head"),
    "v": ("blocks.{}.attn.hook_v", "head"),
    "pattern": ("blocks.{}.attn.hook_pattern", "pattern"),
    "image_embeds": ("hook_image_embeds", "image"),
}
BY = {"pos": ("pos", "group", "layer"), "head": ("head", "pos", "group", "layer"),
      "pattern": ("head", "pos", "group", "layer"), "image": ("layer", "pos", "group")}


def check_component(component: str) -> tuple[str, str]:
    if component not in COMPONENTS:
        raise InterventionError(f"Unknown component {component!r}. Valid components: {sorted(COMPONENTS)}.")
    return COMPONENTS[component]


def n_heads_of(model: HookedMLLM, component: str) -> int:
    """Heads of a component's activation (key/value heads for ``k``/``v``)."""
    if component in ("k", "v"):
        return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    return int(model.cfg.n_heads)


def _positions(L: int, positions: Sequence[int] | None) -> list[int]:
    if positions is None:
        return list(range(L))
    out = []
    for p in positions:
        if not -L <= int(p) < L:
            raise InterventionError(f"Position {p} is out of range for prompts of length {L}.")
        out.append(int(p) % L)
    return out


def _targets(model: HookedMLLM, pair: PatchPair, component: str, kind: str, by: str, layers: list[int],
             heads: Sequence[int] | None, positions: Sequence[int] | None, groups: Sequence[str] | None):
    """Patch targets in output order: ``(layer, site mask in prompt coordinates)``, plus axes and labels."""
    B, L = len(pair), pair.seq_len
    dev = pair.clean.tokens.device
    H = n_heads_of(model, component) if kind in ("head", "pattern") else 0
    if kind in ("head", "pattern"):
        if heads is not None and max(heads, default=-1) >= H:
            raise InterventionError(f"Head index {max(heads)} out of range: {component!r} has {H} heads (0..{H - 1}).")
        hs = list(range(H)) if heads is None else check_heads(model, heads)
    ps = _positions(L, positions)
    gs = list(groups) if groups is not None else pair.groups
    gmasks = {g: pair.group_mask(g) for g in gs} if by == "group" else {}
    if by == "group" and not gs:
        raise InterventionError("No token groups to patch; pass groups=[…].")
    pos_masks = {p: torch.zeros(B, L, dtype=torch.bool, device=dev).index_fill_(1, torch.tensor([p], device=dev),
                                                                               True) for p in ps} if by == "pos" else {}
    all_pos = torch.ones(B, L, dtype=torch.bool, device=dev)
    if kind == "image":
        img = pair.group_mask("image")
        if by == "layer":
            return [(None, img)], (), {}
        if by == "pos":
            return [(None, pos_masks[p] & img) for p in ps], ("pos",), {"pos": ps}
        return [(None, gmasks[g] & img) for g in gs], ("group",), {"group": gs}

    def head_site(pm: Tensor, h_sel: Sequence[int]) -> Tensor:
        hm = torch.zeros(H, dtype=torch.bool, device=dev)
        hm[list(h_sel)] = True
        if kind == "pattern":
            return hm[None, :, None] & pm[:, None, :]  # [B, head, dest_pos]
        return pm[:, :, None] & hm[None, None, :]  # [B, pos, head]

    out: list[tuple[int, Tensor]] = []
    if kind == "pos":
        if by == "layer":
            return [(lyr, all_pos) for lyr in layers], ("layer",), {"layer": layers}
        keys = ps if by == "pos" else gs
        src = pos_masks if by == "pos" else gmasks
        out = [(lyr, src[x]) for lyr in layers for x in keys]
        return out, ("layer", by), {"layer": layers, by: keys}
    if by == "layer":
        return [(lyr, head_site(all_pos, hs)) for lyr in layers], ("layer",), {"layer": layers}
    if by == "head":
        return ([(lyr, head_site(all_pos, [h])) for lyr in layers for h in hs], ("layer", "head"),
                {"layer": layers, "head": hs})
    keys = ps if by == "pos" else gs
    src = pos_masks if by == "pos" else gmasks
    if kind == "pattern":
        return ([(lyr, head_site(src[x], [h])) for lyr in layers for h in hs for x in keys],
                ("layer", "head", by), {"layer": layers, "head": hs, by: keys})
    return ([(lyr, head_site(src[x], [h])) for lyr in layers for x in keys for h in hs],
            ("layer", by, "head"), {"layer": layers, by: keys, "head": hs})


@torch.no_grad()
def activation_patch(model: HookedMLLM, pair: PatchPair, component: str = "resid_pre", by: str = "pos",
                     metric: MetricLike = "logit_diff", direction: str = "denoise", layers: Sequence[int] | None = None,
                     heads: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                     groups: Sequence[str] | None = None, first_token: bool = False, normalize: bool = True,
                     max_rows: int = 32, prefix_reuse: bool = True) -> PatchResult:
    """Patch one component at every target and score each patched run (module doc).

    Args:
        component: one of :data:`COMPONENTS` (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
            ``mlp_out``, ``z``, ``q``, ``k``, ``v``, ``pattern``, ``image_embeds``).
        by: the target grid (``pos``, ``group``, ``layer``, and ``head`` for head components; module doc).
        metric: ``"logit_diff"``, ``"p_binary"`` or a callable on logits ``[batch, pos, vocab]`` → scalar.
        direction: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
        layers, heads, positions, groups: restrict the grid (default: all; ``groups`` default: the pair's
            aligned groups).
        first_token: score only the answers' first tokens.
        normalize: map scores to 0 = corrupted, 1 = clean (False: the raw metric, as TransformerLens returns).
        max_rows: rows per forward (patch targets per forward = ``max_rows // len(pair)``).
        prefix_reuse: start each forward at the first patched layer/position from cached activations.

    Returns:
        :class:`~modality_circuits.patching.engine.PatchResult` (``values`` shaped as in the module table).
    """
    hook_tpl, kind = check_component(component)
    if by not in BY[kind]:
        raise InterventionError(f"by={by!r} is not available for {component!r}; use one of {BY[kind]}.")
    lyrs = check_layers(model, range(model.cfg.n_layers) if layers is None else layers) if kind != "image" else []
    base_batch, src_batch = base_and_source(pair, direction)
    met = PairMetric(model, pair, metric, first_token)
    names = [hook_tpl.format(lyr) for lyr in lyrs] if kind != "image" else [hook_tpl]
    _, src_cache = model.run_with_cache(src_batch, names_filter=lambda n: n in names, return_type=None)
    # image features exist only in a forward from the tokens: no activations to reuse, so record none
    base = (CleanRun.record(model, base_batch, keep_logits=not met.reads_last_only) if kind != "image"
            else CleanRun(base_batch, [], [], []))
    clean_score = met.score(pair.clean)
    corr_score = met.score(pair.corrupted)
    targets, axes, labels = _targets(model, pair, component, kind, by, lyrs, heads, positions, groups)
    B = len(pair)
    # one Patch per target; targets sharing a layer and first position run side by side from that prefix
    patches = [Patch(hook_tpl.format(layer) if layer is not None else hook_tpl, site,
                     src_cache[hook_tpl.format(layer) if layer is not None else hook_tpl], kind)
               for layer, site in targets]
    order = sorted(range(len(targets)), key=lambda t: (targets[t][0] or 0, site_first_position(targets[t][1], kind)))
    raw = torch.full((len(targets),), float("nan"))
    for ch in chunks(len(order), B, max_rows):
        idx = [order[i] for i in ch]
        vals = run(model, base, [patches[t] for t in idx], met.metric, prefix=prefix_reuse)  # [k, batch]
        if not torch.isfinite(vals).all():
            raise NumericalError("Patched metric values contain NaN/inf; check the model dtype (float32).")
        raw[idx] = vals.mean(1)
        logger.debug("patched %s targets %s", component, idx)
    shape = tuple(len(labels[a]) for a in axes)
    raw = raw.view(shape)
    values = normalise(raw, clean_score, corr_score) if normalize else raw.clone()
    if "pos" in labels:
        pos = labels["pos"]
        labels["pos"] = position_labels(model, pair.clean, pos)
        pos_groups = position_groups(pair.clean, pos)
    else:
        pos_groups = []
    return PatchResult(values, raw, axes, labels, clean_score, corr_score, component, met.name, direction, pos_groups)


# ----------------------------------------------------------------------------------------- named versions
def patch_resid_pre(model: HookedMLLM, pair: PatchPair, by: str = "pos", **kw: Any) -> PatchResult:
    """Residual stream at the start of each block. ``[layer, pos]`` / ``[layer, group]`` / ``[layer]``."""
    return activation_patch(model, pair, "resid_pre", by, **kw)


def patch_resid_mid(model: HookedMLLM, pair: PatchPair, by: str = "pos", **kw: Any) -> PatchResult:
    """Residual stream between attention and MLP. ``[layer, pos]`` / ``[layer, group]`` / ``[layer]``."""
    return activation_patch(model, pair, "resid_mid", by, **kw)


def patch_resid_post(model: HookedMLLM, pair: PatchPair, by: str = "pos", **kw: Any) -> PatchResult:
    """Residual stream at the end of each block. ``[layer, pos]`` / ``[layer, group]`` / ``[layer]``."""
    return activation_patch(model, pair, "resid_post", by, **kw)


def patch_attn_out(model: HookedMLLM, pair: PatchPair, by: str = "pos", **kw: Any) -> PatchResult:
    """Attention layer output. ``[layer, pos]`` / ``[layer, group]`` / ``[layer]``."""
    return activation_patch(model, pair, "attn_out", by, **kw)


def patch_mlp_out(model: HookedMLLM, pair: PatchPair, by: str = "pos", **kw: Any) -> PatchResult:
    """MLP output. ``[layer, pos]`` / ``[layer, group]`` / ``[layer]``."""
    return activation_patch(model, pair, "mlp_out", by, **kw)


def patch_head_out(model: HookedMLLM, pair: PatchPair, by: str = "head", **kw: Any) -> PatchResult:
    """Each head's output ``z``. ``[layer, head]`` / ``[layer, pos, head]`` / ``[layer, group, head]``."""
    return activation_patch(model, pair, "z", by, **kw)


def patch_head_q(model: HookedMLLM, pair: PatchPair, by: str = "head", **kw: Any) -> PatchResult:
    """Each head's queries. ``[layer, head]`` / ``[layer, pos, head]`` / ``[layer, group, head]``."""
    return activation_patch(model, pair, "q", by, **kw)


def patch_head_k(model: HookedMLLM, pair: PatchPair, by: str = "head", **kw: Any) -> PatchResult:
    """Each key/value head's keys. ``[layer, kv_head]`` / ``[layer, pos, kv_head]`` / ``[layer, group, kv_head]``."""
    return activation_patch(model, pair, "k", by, **kw)


def patch_head_v(model: HookedMLLM, pair: PatchPair, by: str = "head", **kw: Any) -> PatchResult:
    """Each key/value head's values. ``[layer, kv_head]`` / ``[layer, pos, kv_head]`` / ``[layer, group, kv_head]``."""
    return activation_patch(model, pair, "v", by, **kw)


def patch_head_pattern(model: HookedMLLM, pair: PatchPair, by: str = "head", **kw: Any) -> PatchResult:
    """Each head's attention pattern. ``[layer, head]`` / ``[layer, head, dest_pos]`` / ``[layer, head, group]``."""
    return activation_patch(model, pair, "pattern", by, **kw)


def patch_image_embeds(model: HookedMLLM, pair: PatchPair, by: str = "layer", **kw: Any) -> PatchResult:
    """The projected image features (``hook_image_embeds``, re-running the vision tower's output into the
    decoder). ``[]`` (all image tokens) / ``[pos]`` / ``[group]``."""
    return activation_patch(model, pair, "image_embeds", by, **kw)


__all__ = ["BY", "COMPONENTS", "activation_patch", "check_component", "n_heads_of", "patch_attn_out",
           "patch_head_k", "patch_head_out", "patch_head_pattern", "patch_head_q", "patch_head_v",
           "patch_image_embeds", "patch_mlp_out", "patch_resid_mid", "patch_resid_post", "patch_resid_pre"]
