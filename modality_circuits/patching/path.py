"""Path patching (Wang et al. 2022, "Interpretability in the Wild"), in token-group terms.


Path patching measures the effect of **senders** on the output that flows *only through* chosen **receivers**.
With ``direction="noise"`` (the default, as in the paper) the base run is the **clean** prompt and sender
activations come from the **corrupted** prompt; ``direction="denoise"`` swaps the roles. The standard three runs:

1. cache the clean and corrupted runs;
2. run the base prompt with the senders patched from the other prompt and everything in ``freeze`` held at
   its base value (``"heads"``: every other head's output ``z``, MLPs recomputed — the paper's setting;
   ``"heads+mlps"``: MLP outputs too, so only direct residual paths remain; ``"none"``: nothing, so the
   receivers see the senders' total effect through any path); record the receivers' inputs;
3. run the base prompt with only the receivers' inputs replaced by the recorded values, and score it.

Senders: ``[(layer, head), …]`` or :class:`HeadOutputs` (head outputs, optionally at a group's positions), or
:class:`GroupResid` (a token group's residual stream ``resid_pre`` at one or several layers). Receivers:
:class:`HeadInputs` (heads' ``q``/``k``/``v`` at a group's positions) or :class:`ResidAt` (the residual stream at
a group's positions before a layer; ``layer = n_layers`` is the final residual read by the unembedding).
Default ``freeze``: ``"heads"`` if any sender is a head, else ``"none"`` (a group's residual reaches other
positions only through heads). So "image → instruction anchors → last" is one call::

    path_patch(model, pair, senders=GroupResid("image", layer=0), receivers=ResidAt("instruction", layer=4))

Receivers = the whole residual stream right after a single layer of senders (``ResidAt(None, layer=l + 1)``)
reproduces activation patching of the senders exactly (tested). Scores are normalised so that the corrupted
run is 0 and the clean run is 1 (noising: a strong path gives a value near 0). :func:`path_patch_heads` scans
every head as its own sender in batched runs (``[layer, head]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..engine import CleanRun, run
from ..errors import InterventionError, NumericalError
from ..interventions.base import apply_stack
from ..interventions.core import check_heads, check_layers
from ..interventions.heads import normalize_heads
from ..interventions.patch import Patch
from ..metrics import MetricLike
from ..prompts import MLLMBatch
from .engine import PairMetric, PatchResult, base_and_source, chunks, normalise
from .pairs import PatchPair

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

FREEZE = ("heads", "heads+mlps", "none")
GroupSel = str | Sequence[str] | None


@dataclass(frozen=True)
class HeadOutputs:
    """Sender: the outputs ``z`` of ``heads`` (``[(layer, head), …]``) at ``positions`` (a group; None: all)."""

    heads: Sequence[tuple[int, int]]
    positions: GroupSel = None


@dataclass(frozen=True)
class GroupResid:
    """Sender: the residual stream ``resid_pre`` of ``group`` (None: all positions) at ``layer`` (int or several)."""

    group: GroupSel
    layer: int | Sequence[int] = 0


@dataclass(frozen=True)
class HeadInputs:
    """Receiver: the ``input`` (``"q"``, ``"k"``, ``"v"`` or several) of ``heads`` at ``positions`` (None: all).

    Heads are query heads; under grouped-query attention a ``k``/``v`` receiver is the key/value head the
    query head reads (shared with the other query heads of its group).
    """

    heads: Sequence[tuple[int, int]]
    input: str | Sequence[str] = "q"
    positions: GroupSel = None


@dataclass(frozen=True)
class ResidAt:
    """Receiver: the residual stream at ``group``'s positions (None: all) entering ``layer``
    (``n_layers`` or -1: the final residual, after the last block)."""

    group: GroupSel = "last"
    layer: int = -1


def _gmask(batch: MLLMBatch, group: GroupSel, pair: PatchPair | None = None) -> Tensor:
    if group is None:
        return torch.ones(len(batch), batch.seq_len, dtype=torch.bool, device=batch.tokens.device)
    if pair is not None:
        return pair.group_mask(group)
    return batch.spans.mask(group if isinstance(group, str) else list(group), allow_empty=True)


def _as_list(x: Any) -> list:
    if isinstance(x, (HeadOutputs, GroupResid, HeadInputs, ResidAt)):
        return [x]
    if isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, int) for v in x):
        return [x]
    return list(x) if x is not None else []


def _senders(model: HookedMLLM, pair: PatchPair, senders: Any) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Sender set -> (``{layer: Bool[batch, pos, head]}`` head sites, ``{layer: Bool[batch, pos]}`` resid sites)."""
    items = _as_list(senders)
    loose = [s for s in items if isinstance(s, (tuple, list)) and not isinstance(s, (HeadOutputs, GroupResid))]
    items = [s for s in items if isinstance(s, (HeadOutputs, GroupResid))] + ([HeadOutputs(loose)] if loose else [])
    B, L, H = len(pair), pair.seq_len, model.cfg.n_heads
    dev = pair.clean.tokens.device
    z: dict[int, Tensor] = {}
    res: dict[int, Tensor] = {}
    for s in items:
        if isinstance(s, HeadOutputs):
            pm = _gmask(pair.clean, s.positions, pair)
            for layer, hs in normalize_heads(model, s.heads).items():
                hm = torch.zeros(H, dtype=torch.bool, device=dev)
                hm[hs] = True
                z[layer] = z.get(layer, torch.zeros(B, L, H, dtype=torch.bool, device=dev)) | (
                    pm[:, :, None] & hm[None, None])
        else:
            pm = _gmask(pair.clean, s.group, pair)
            for layer in check_layers(model, s.layer if isinstance(s.layer, int) else list(s.layer)):
                res[layer] = res.get(layer, torch.zeros(B, L, dtype=torch.bool, device=dev)) | pm
    if not any(bool(m.any()) for m in [*z.values(), *res.values()]):
        raise InterventionError("The sender set is empty: give heads [(layer, head), …], HeadOutputs(...) or "
                                "GroupResid(group, layer) whose positions hold tokens.")
    return z, res


def _receivers(model: HookedMLLM, batch: MLLMBatch, receivers: Any) -> list[tuple[str, str, int, Tensor]]:
    """Receivers -> ``[(hook name, site kind, layer, site mask)]`` in base-run coordinates."""
    items = _as_list(receivers)
    n, H = model.cfg.n_layers, model.cfg.n_heads
    Hkv = int(getattr(model.cfg, "n_key_value_heads", None) or H)
    dev = batch.tokens.device
    out: dict[str, tuple[str, str, int, Tensor]] = {}
    for r in items:
        if isinstance(r, ResidAt):
            layer = n if r.layer in (-1, n) else check_layers(model, [r.layer])[0]
            name = f"blocks.{n - 1}.hook_resid_post" if layer == n else f"blocks.{layer}.hook_resid_pre"
            m = _gmask(batch, r.group)
            prev = out.get(name)
            out[name] = (name, "pos", layer, m if prev is None else prev[3] | m)
        elif isinstance(r, HeadInputs):
            inputs = [r.input] if isinstance(r.input, str) else list(r.input)
            bad = [x for x in inputs if x not in ("q", "k", "v")]
            if bad or not inputs:
                raise InterventionError(f"HeadInputs input must be 'q', 'k' or 'v' (or several); got {r.input!r}.")
            pm = _gmask(batch, r.positions)
            for layer, hs in normalize_heads(model, r.heads).items():
                for x in inputs:
                    Hc = H if x == "q" else Hkv
                    hm = torch.zeros(Hc, dtype=torch.bool, device=dev)
                    hm[[h if x == "q" else h // (H // Hc) for h in hs]] = True
                    name = f"blocks.{layer}.attn.hook_{x}"
                    m = pm[:, :, None] & hm[None, None]
                    prev = out.get(name)
                    out[name] = (name, "head", layer, m if prev is None else prev[3] | m)
        else:
            raise InterventionError(f"Unknown receiver {r!r}; use HeadInputs(heads, input, positions) or "
                                    "ResidAt(group, layer).")
    sites = [s for s in out.values() if bool(s[3].any())]
    if not sites:
        raise InterventionError("The receiver set is empty: give HeadInputs(...) or ResidAt(...) whose positions "
                                "hold tokens.")
    return sites


def _has_path(z: dict[int, Tensor], res: dict[int, Tensor], recv: list) -> bool:
    for _, _, lr, _ in recv:
        if any(ls < lr for ls, m in z.items() if m.any()) or any(ls <= lr for ls, m in res.items() if m.any()):
            return True
    return False


@torch.no_grad()
def _path_patch_sets(model: HookedMLLM, pair: PatchPair, sender_sets: list[tuple[dict, dict]], receivers: Any,
                     metric: MetricLike, direction: str, freeze: str, first_token: bool, max_rows: int
                     ) -> tuple[Tensor, float, float, str]:
    """Raw metric of every sender set (NaN where no sender reaches a receiver), clean and corrupted scores."""
    if freeze not in FREEZE:
        raise InterventionError(f"freeze must be one of {FREEZE}; got {freeze!r}.")
    base_batch, src_batch = base_and_source(pair, direction)
    recv = _receivers(model, base_batch, receivers)
    met = PairMetric(model, pair, metric, first_token)
    n, B = model.cfg.n_layers, len(pair)
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(n)]
    # cache only what the runs read: senders' activations from the source run, frozen ones from the base run
    src_names = {z_names[lyr] for z, _ in sender_sets for lyr in z} | {
        f"blocks.{lyr}.hook_resid_pre" for _, res in sender_sets for lyr in res}
    _, src_cache = model.run_with_cache(src_batch, names_filter=lambda x: x in src_names, return_type=None)
    first = min([lr if not name.endswith("resid_post") else n - 1 for name, _, lr, _ in recv]
                + [lyr for z, res in sender_sets for lyr in [*z, *res]])
    base_names = set() if freeze == "none" else {z_names[i] for i in range(first, n)}
    if freeze == "heads+mlps":
        base_names |= {f"blocks.{i}.hook_mlp_out" for i in range(first, n)}
    _, base_cache = model.run_with_cache(base_batch, names_filter=lambda x: x in base_names, return_type=None)
    base = CleanRun.record(model, base_batch, keep_logits=not met.reads_last_only)
    clean_score, corr_score = met.score(pair.clean), met.score(pair.corrupted)

    raw = torch.full((len(sender_sets),), float("nan"))
    live = [i for i, (z, res) in enumerate(sender_sets) if _has_path(z, res, recv)]
    if len(live) < len(sender_sets):
        logger.info("%d sender set(s) reach no receiver (all receivers upstream); left as NaN.",
                    len(sender_sets) - len(live))
    stop = min(n, max(lr + 1 if name.endswith("hook_resid_pre") or ".attn." in name else lr for name, _, lr, _ in recv))
    r_l0 = min(lr if not name.endswith("resid_post") else n - 1 for name, _, lr, _ in recv)
    for ch in chunks(len(live), B, max_rows):
        idx = [live[i] for i in ch]
        k = len(idx)
        sets = [sender_sets[i] for i in idx]
        l0 = min(min(min([*z.keys(), *res.keys()]) for z, res in sets), r_l0)
        # ---- run 2: senders patched, `freeze` held at base, receivers' inputs recorded (one copy per set)
        configs = [_sender_patches(model, z, res, l0, freeze, src_cache, base_cache) for z, res in sets]
        recorded: dict[str, Tensor] = {}

        def record(act: Tensor, hook: Any) -> Tensor:
            recorded[hook.name] = act.clone()  # noqa: B023 (used within this iteration)
            return act

        with apply_stack(model, base_batch, configs), model.hooks(fwd_hooks=[(nm, record) for nm, _, _, _ in recv]):
            base.suffix_pass(model, l0, 0, k, with_cache=False, stop_at_layer=stop)()
        # ---- run 3: base run with only the receivers' inputs replaced (copy j gets set j's recorded inputs)
        configs = [tuple(Patch(nm, m, recorded[nm][j * B:(j + 1) * B], kind) for nm, kind, _, m in recv)
                   for j in range(k)]
        vals = run(model, base, configs, met.metric)
        if not torch.isfinite(vals).all():
            raise NumericalError("Patched metric values contain NaN/inf; check the model dtype (float32).")
        raw[idx] = vals.mean(1)
    return raw, clean_score, corr_score, met.name


def _sender_patches(model: HookedMLLM, z: dict[int, Tensor], res: dict[int, Tensor], l0: int, freeze: str,
                    src_cache: Any, base_cache: Any) -> tuple[Patch, ...]:
    """One sender set as patches: head outputs and residuals from the source run; with ``freeze``, every other
    head output (and MLP output) of layers ``l0 …`` held at its base-run value."""
    out = []
    for layer in range(l0, model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        zm = z.get(layer)
        if freeze != "none" and name in base_cache:
            site = zm if zm is not None else torch.zeros_like(base_cache[name][..., 0], dtype=torch.bool)
            src = src_cache[name] if name in src_cache else base_cache[name]
            out.append(Patch(name, site, src, "head", fallback=base_cache[name]))
        elif zm is not None and zm.any():
            out.append(Patch(name, zm, src_cache[name], "head"))
        if layer in res:
            rname = f"blocks.{layer}.hook_resid_pre"
            out.append(Patch(rname, res[layer], src_cache[rname], "pos"))
        if freeze == "heads+mlps":
            mname = f"blocks.{layer}.hook_mlp_out"
            full = torch.ones(base_cache[mname].shape[:2], dtype=torch.bool, device=base_cache[mname].device)
            out.append(Patch(mname, full, base_cache[mname], "pos"))
    return tuple(out)


def _default_freeze(z: dict, freeze: str | None) -> str:
    return freeze if freeze is not None else ("heads" if z else "none")


def path_patch(model: HookedMLLM, pair: PatchPair, senders: Any, receivers: Any, metric: MetricLike = "logit_diff",
               direction: str = "noise", freeze: str | None = None, first_token: bool = False,
               normalize: bool = True) -> PatchResult:
    """Effect of ``senders`` on the output through ``receivers`` only (module doc); a 0-d :class:`PatchResult`.

    Args:
        senders: ``[(layer, head), …]``, :class:`HeadOutputs`, :class:`GroupResid`, or a list of these
            (patched together).
        receivers: :class:`HeadInputs`, :class:`ResidAt`, or a list of these.
        metric: ``"logit_diff"``, ``"p_binary"`` or a callable on logits.
        direction: ``"noise"`` (clean base, corrupted senders; default) or ``"denoise"``.
        freeze: ``"heads"``, ``"heads+mlps"`` or ``"none"`` (default: ``"heads"`` if a sender is a head).

    Raises:
        InterventionError: empty sender or receiver set, or no receiver downstream of any sender.
    """
    z, res = _senders(model, pair, senders)
    base_batch, _ = base_and_source(pair, direction)
    if not _has_path(z, res, _receivers(model, base_batch, receivers)):
        raise InterventionError("No receiver is downstream of a sender: a head sender at layer l reaches receivers "
                                "at layers > l, a residual sender at layer l receivers at layers >= l.")
    fr = _default_freeze(z, freeze)
    raw, clean, corr, name = _path_patch_sets(model, pair, [(z, res)], receivers, metric, direction, fr, first_token,
                                              max_rows=len(pair))
    raw = raw[0]
    values = normalise(raw, clean, corr) if normalize else raw.clone()
    return PatchResult(values, raw, (), {}, clean, corr, f"path[{fr}]", name, direction)


def path_patch_heads(model: HookedMLLM, pair: PatchPair, receivers: Any, layers: Sequence[int] | None = None,
                     heads: Sequence[int] | None = None, positions: GroupSel = None, metric: MetricLike = "logit_diff",
                     direction: str = "noise", freeze: str = "heads", first_token: bool = False,
                     normalize: bool = True, max_rows: int = 32) -> PatchResult:
    """Every head (at ``positions``) as its own sender, batched: ``[layer, head]`` (NaN: no path to a receiver)."""
    lyrs = check_layers(model, range(model.cfg.n_layers) if layers is None else layers)
    hs = list(range(model.cfg.n_heads)) if heads is None else check_heads(model, heads)
    sets = [_senders(model, pair, HeadOutputs([(lyr, h)], positions)) for lyr in lyrs for h in hs]
    raw, clean, corr, name = _path_patch_sets(model, pair, sets, receivers, metric, direction, freeze, first_token,
                                              max_rows)
    raw = raw.view(len(lyrs), len(hs))
    values = normalise(raw, clean, corr) if normalize else raw.clone()
    return PatchResult(values, raw, ("layer", "head"), {"layer": lyrs, "head": hs}, clean, corr, f"path[{freeze}]",
                       name, direction)


__all__ = ["FREEZE", "GroupResid", "HeadInputs", "HeadOutputs", "ResidAt", "path_patch", "path_patch_heads"]
