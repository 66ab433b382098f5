"""Head scores as ``[layer, head]`` tables from four methods, and top-p% selection.

All scores are oriented so that **higher = more important for following the instruction**:

* ``ablation`` (exact): ``−mean Δ`` where ``Δ`` is the relative change of the binary following probability
  when the head's ``hook_z`` is zero- or mean-ablated (at all positions, or only at chosen positions).
  Batched: all heads of a layer are ablated side by side (one copy of the batch per head) in one forward that
  starts at that layer from cached residuals and, for position-restricted ablation, at the first ablated
  position with cached keys/values (:func:`modality_circuits.engine.run`). Also reports the change of the
  first-token logit difference (``ablation_logit``), the quantity attribution patching approximates.
* ``attribution`` (attribution patching): one forward and one backward; ``−Σ_pos ∂LD/∂z · (baseline − z)``,
  the first-order estimate of the ablation's effect on the first-token logit difference ``LD``.
* ``dla`` (direct logit attribution): each head's direct contribution to ``LD`` at the last position
  (final norm scale frozen).
* ``attention``: attention mass from the ``last`` and ``instruction`` queries to the instructed modality's tokens
  (``image`` for vision-following samples, ``context`` for text-following ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, no_type_check

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._types import Float
from ..engine import CleanRun, chunked, run
from ..errors import InterventionError
from ..interventions.heads import ScaleHeads, mean_z
from ..lens import _answer_dirs, answer_direction, direct_effect
from ..metrics import AnswerMetric, relative_change
from ..prompts import MLLMBatch
from ..spans import GroupSpec
from .units import sweep_in_units

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

METHODS = ("ablation", "attribution", "dla", "attention")


def _first_token_ld(logits: Tensor, f: Tensor, c: Tensor) -> Tensor:
    last = logits[:, -1]
    return last.gather(1, f[:, None])[:, 0] - last.gather(1, c[:, None])[:, 0]


LOGPROBS = AnswerMetric("logprobs")


def _scores(lp: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 4]`` (full f, full c, first f, first c) -> (binary following probability, first-token LD)."""
    return torch.sigmoid(lp[..., 0] - lp[..., 1]), lp[..., 2] - lp[..., 3]


@torch.no_grad()
def ablation_scan_batch(model: HookedMLLM, batch: MLLMBatch, mode: str = "zero", positions: GroupSpec | None = None,
                        first_token: bool = False, baseline: Tensor | None = None,
                        max_configs: int | None = None) -> dict[str, Float[Tensor, "layer n_heads batch"]]:
    """Exact effect of ablating each head, for one batch: a thin wrapper over :func:`modality_circuits.engine.run`
    (the heads of a layer side by side, one copy of the batch per head, from that layer and the first ablated
    position).

    Returns ``{"delta": relative change of p_binary, "d_logit": change of first-token LD}`` as
    ``[layer, n_heads, batch]`` tensors. ``baseline`` (mean mode): ``[layer, n_heads, d_head]``, default the mean
    over this batch (:func:`~modality_circuits.interventions.mean_z`).
    """
    if mode not in ("zero", "mean"):
        raise InterventionError(f"Ablation mode must be 'zero' or 'mean', got {mode!r}.")
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(batch)
    if positions is not None:
        batch.spans.resolve(positions, allow_empty=True)  # a clear error now, not inside a hook
    metric = AnswerMetric("logprobs", first_token=first_token)
    base = baseline if baseline is not None else (mean_z(model, batch) if mode == "mean" else None)
    clean = CleanRun.record(model, batch)
    p_base, ld_base = _scores(run(model, clean, [()], metric)[0])
    delta = torch.zeros(L, H, B)
    dlog = torch.zeros(L, H, B)
    for layer in range(L):
        configs = [ScaleHeads([(layer, h)], 0.0, positions, base) for h in range(H)]
        vals = torch.cat([run(model, clean, part, metric) for part in chunked(configs, max_configs or H)])
        p, ld = _scores(vals)  # [n_heads, batch]
        delta[layer] = relative_change(p_base[None], p)
        dlog[layer] = ld - ld_base[None]
    return {"delta": delta, "d_logit": dlog}


def attribution_batch(model: HookedMLLM, batch: MLLMBatch, mode: str = "zero", baseline: Tensor | None = None,
                      positions: GroupSpec | None = None) -> Float[Tensor, "layer n_heads batch"]:
    """Attribution patching: first-order estimate of each head's ablation effect on the first-token LD."""
    L = model.cfg.n_layers
    base = baseline if baseline is not None else (mean_z(model, batch) if mode == "mean" else None)
    f, c = _answer_dirs(model, batch.samples)
    zs: dict[int, Tensor] = {}

    def keep(z: Tensor, hook: Any) -> Tensor:
        if not z.requires_grad:  # frozen parameters (model.requires_grad_(False)): z becomes a leaf
            z = z.detach().requires_grad_(True)
        zs[int(hook.name.split(".")[1])] = z
        return z

    # autograd.grad w.r.t. the z's only: no parameter gradients are computed, and the user's .grad is untouched
    with torch.enable_grad(), model.hooks(fwd_hooks=[(f"blocks.{i}.attn.hook_z", keep) for i in range(L)]):
        logits = model(batch)
        grads = torch.autograd.grad(_first_token_ld(logits, f, c).sum(), [zs[i] for i in range(L)])
    pm = None if positions is None else batch.spans.resolve(positions, allow_empty=True)
    out = []
    for i in range(L):
        z, g = zs[i].detach(), grads[i]
        b = 0 if base is None else base[i][None, None]
        est = (g * (b - z)).sum(-1)  # [batch, pos, n_heads]
        est = est * (batch.attention_mask.bool() if pm is None else pm)[..., None].to(est.dtype)
        out.append(est.sum(1).T)  # [n_heads, batch]
    return torch.stack(out).detach().cpu()


@torch.no_grad()
def dla_batch(model: HookedMLLM, batch: MLLMBatch) -> Float[Tensor, "layer n_heads batch"]:
    """Direct contribution of each head to the first-token LD at the last position (frozen final scale)."""
    names = [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)] + ["ln_final.hook_scale"]
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names, return_type=None)
    d = answer_direction(model, batch.samples)  # [batch, d_model]
    scale = cache["ln_final.hook_scale"][:, -1]  # [batch, 1]
    out = []
    for i in range(model.cfg.n_layers):
        z = cache[f"blocks.{i}.attn.hook_z"][:, -1]  # [batch, n_heads, d_head]
        per_head = torch.einsum("bhd,hdm->hbm", z, model.W_O[i])  # [n_heads, batch, d_model]
        out.append(direct_effect(per_head, d, scale))
    return torch.stack(out).cpu()


@torch.no_grad()
def attention_mass_batch(model: HookedMLLM, batch: MLLMBatch, queries: Sequence[str] = ("last", "instruction")
                         ) -> Float[Tensor, "layer n_heads batch"]:
    """Attention mass from ``queries`` to the instructed modality's tokens, per head."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names, return_type=None)
    q = batch.spans.resolve(list(queries), allow_empty=True)  # [batch, pos]
    img = batch.spans.mask("image", allow_empty=True) if "image" in batch.spans else torch.zeros_like(q)
    ctx = batch.spans.mask("context", allow_empty=True) if "context" in batch.spans else torch.zeros_like(q)
    follow_img = torch.tensor([s.follow == "image" for s in batch.samples], device=q.device)
    k = torch.where(follow_img[:, None], img, ctx)  # [batch, pos]
    out = []
    for name in names:
        p = cache[name]  # [batch, n_heads, q_pos, k_pos]
        mass = (p * k[:, None, None, :]).sum(-1)  # [batch, n_heads, q_pos]
        out.append(((mass * q[:, None]).sum(-1) / q.sum(-1).clamp_min(1)[:, None]).T)
    return torch.stack(out).cpu()


def head_scores(model: HookedMLLM, samples: Sequence[Any], method: str = "ablation", mode: str = "zero",
                positions: GroupSpec | None = None, batch_size: int = 16, first_token: bool = False,
                baseline: Tensor | None = None, progress: bool = True, units_dir: str | Path | None = None,
                shard: tuple[int, int] | None = None, retries: int = 1, executor: Any = None
                ) -> pd.DataFrame | None:
    """Per-sample head scores as a tidy table (``layer, head, sample_id, condition, score``; higher = more important).

    Mean ablation (``mode="mean"``) uses one baseline for every batch: ``baseline``, default the mean ``z`` over
    all ``samples`` (:func:`~modality_circuits.interventions.mean_z`), the same definition blocking uses.
    Aggregate to a ``[layer, head]`` matrix with :func:`score_matrix`. ``units_dir`` / ``shard`` / ``executor``:
    as work units (:func:`~modality_circuits.sweeps.units.sweep_in_units`; None while other shards are missing).
    """
    if method not in METHODS:
        raise InterventionError(f"Unknown head-score method {method!r}; choose from {METHODS}.")
    if mode not in ("zero", "mean"):
        raise InterventionError(f"Ablation mode must be 'zero' or 'mean', got {mode!r}.")
    if mode == "mean" and baseline is None and method in ("ablation", "attribution"):
        baseline = mean_z(model, list(samples), batch_size)
    kwargs = {"method": method, "mode": mode, "positions": positions, "first_token": first_token,
              "baseline": baseline}
    params = {"sweep": "head_scores", "method": method, "mode": mode, "positions": positions,
              "first_token": first_token, "baseline": None if baseline is None else round(float(baseline.sum()), 4)}
    return sweep_in_units(model, samples, head_score_rows, kwargs, params, units_dir, batch_size, shard, retries,
                          progress, f"head scores ({method})", executor)


def head_score_rows(model: HookedMLLM, chunk: Sequence[Any], *, method: str, mode: str, positions: GroupSpec | None,
                    first_token: bool, baseline: Tensor | None) -> pd.DataFrame:
    """One batch's rows of :func:`head_scores` (one work unit)."""
    batch = model.prepare(list(chunk))
    extra: dict[str, Tensor] = {}
    if method == "ablation":
        r = ablation_scan_batch(model, batch, mode, positions, first_token=first_token, baseline=baseline)
        score, extra = -r["delta"], {"d_logit": r["d_logit"]}
    elif method == "attribution":
        score = -attribution_batch(model, batch, mode, baseline=baseline, positions=positions)
    elif method == "dla":
        score = dla_batch(model, batch)
    else:
        score = attention_mass_batch(model, batch)
    L, H, B = score.shape
    rows = []
    for i, s in enumerate(chunk):
        for layer in range(L):
            for h in range(H):
                row = {"layer": layer, "head": h, "sample_id": s.id, "condition": s.follow, "task": s.task,
                       "method": method, "score": float(score[layer, h, i])}
                for k, v in extra.items():
                    row[k] = float(v[layer, h, i])
                rows.append(row)
    return pd.DataFrame(rows)


def score_matrix(df: pd.DataFrame, condition: str | None = None, value: str = "score") -> np.ndarray:
    """Mean score per head as a ``[layer, head]`` array (optionally for one condition)."""
    d = df if condition is None else df[df["condition"] == condition]
    m = d.groupby(["layer", "head"])[value].mean().unstack("head")
    return m.to_numpy()


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
def select_heads(scores: np.ndarray, pct: float = 5.0) -> list[tuple[int, int]]:
    """The top ``pct``% heads (at least one) of a ``[layer, head]`` score matrix, best first."""
    if not (isinstance(pct, (int, float)) and 0 < pct <= 100):
        raise InterventionError(f"pct must be in (0, 100], got {pct!r}.")
    k = max(1, int(round(pct / 100 * scores.size)))
    flat = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=None)[:k]
    return [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in flat]
