"""The critical-heads experiment: select the top p% heads, block them, amplify them, with controls.

Protocol (the paper's, made explicit):

1. Conflict samples are split (seeded) into a **selection** split and a disjoint **evaluation** split.
2. Head scores (:func:`~modality_circuits.sweeps.heads.head_scores`) are computed on the selection split; the
   top ``pct``% heads by the chosen method (and condition, or both pooled) are selected.
3. On the evaluation split, per condition (vision- / text-following): MFR before and after **blocking** the
   selected heads (zero or mean ablation of ``hook_z``); the share of **failed** samples (not following before)
   **restored** by amplifying the selected heads' output by each ``α``. A model that rarely fails leaves few
   failed samples in the evaluation split; ``failed_pool`` adds more conflict samples (disjoint from the selection
   split) that are only searched for failures to amplify.
4. **Controls**: the same with ``n_random`` random head sets of equal size (mean ± std), and **general
   ability** (accuracy on single-modality probes and consistent samples) before and after blocking.

Everything comes back as one tidy table (one row per measurement, each rate with its seeded bootstrap 95% interval
over samples, ``ci_low``/``ci_high``, :func:`~modality_circuits.stats.bootstrap_ci`) plus the selection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..errors import InterventionError
from ..interventions.base import Intervention, apply
from ..interventions.heads import ScaleHeads, mean_z
from ..metrics import following_scores
from ..stats import bootstrap_ci
from .heads import head_scores, score_matrix, select_heads
from .units import sweep_in_units

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)


@dataclass
class HeadExperimentResult:
    """Outputs of :func:`heads_experiment`."""

    table: pd.DataFrame  # one row per measurement
    scores: pd.DataFrame  # per-sample head scores on the selection split
    selected: list[tuple[int, int]]
    random_sets: list[list[tuple[int, int]]]
    split: dict[str, list[str]] = field(default_factory=dict)  # sample ids of each split

    def summary(self) -> pd.DataFrame:
        """The paper-style results table: one row per (condition, measure, intervention, alpha)."""
        t = self.table
        sel = t[t["heads"] != "random"]
        rnd = t[t["heads"] == "random"].groupby(["condition", "measure", "intervention", "alpha"], dropna=False)[
            "value"].agg(["mean", "std"]).reset_index().rename(columns={"mean": "random_mean", "std": "random_std"})
        return sel.merge(rnd, on=["condition", "measure", "intervention", "alpha"], how="left")


def split_samples(samples: Sequence[Any], select_frac: float, seed: int) -> tuple[list[Any], list[Any]]:
    if not 0 < select_frac < 1:
        raise InterventionError(f"select_frac must be in (0, 1), got {select_frac}.")
    idx = np.random.default_rng(seed).permutation(len(samples))
    k = max(1, int(round(select_frac * len(samples))))
    return [samples[i] for i in idx[:k]], [samples[i] for i in idx[k:]]


def follow_rows(model: HookedMLLM, samples: Sequence[Any], *, configs: Sequence[tuple[dict, Sequence[Intervention]]],
                batch_size: int) -> pd.DataFrame:
    """Whether each sample follows its instruction under each configuration ``(label, interventions)``: one row per
    sample × configuration (``sample_id``, the label's fields, ``followed``). One work unit of the experiment; the
    prompts are built once and scored under every configuration."""
    batches = [model.prepare(list(samples[i:i + batch_size])) for i in range(0, len(samples), batch_size)]
    rows = []
    for label, ivs in configs:
        with apply(model, None, *ivs):
            f = torch.cat([following_scores(model, b).followed for b in batches])
        rows += [{"sample_id": s.id, **label, "followed": bool(x)} for s, x in zip(samples, f.tolist())]
    return pd.DataFrame(rows)


def _follow_table(model: HookedMLLM, samples: Sequence[Any], configs: list[tuple[dict, list[Intervention]]],
                  batch_size: int, units: dict[str, Any], name: str, params: dict[str, Any]) -> pd.DataFrame:
    """:func:`follow_rows` over ``samples`` (as work units under ``units["dir"]/name`` when given)."""
    if not samples:
        return pd.DataFrame(columns=["sample_id", "heads", "draw", "alpha", "followed"])
    root = None if units.get("dir") is None else Path(units["dir"]) / name
    df = sweep_in_units(model, samples, follow_rows, {"configs": configs, "batch_size": batch_size},
                        {"sweep": f"heads/{name}", **params}, root, batch_size, None, units.get("retries", 1),
                        False, f"heads: {name}", units.get("executor"))
    return df if df is not None else pd.DataFrame(columns=["sample_id", "heads", "draw", "alpha", "followed"])


def _pick(df: pd.DataFrame, samples: Sequence[Any], **label: Any) -> torch.Tensor:
    """The ``followed`` column of ``samples`` (in their order) for one configuration label."""
    d = df
    for k, v in label.items():
        d = d[d[k] == v]
    d = d.set_index("sample_id")
    return torch.tensor([bool(d.loc[s.id, "followed"]) for s in samples], dtype=torch.bool)


def random_head_sets(n_layers: int, n_heads: int, size: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    return [[(int(i // n_heads), int(i % n_heads)) for i in rng.choice(n_layers * n_heads, size, replace=False)]
            for _ in range(n)]


def heads_experiment(model: HookedMLLM, conflict: Sequence[Any], general: Sequence[Any] = (), *, pct: float = 5.0,
                     method: str = "ablation", select_condition: str | None = None, mode: str = "zero",
                     alphas: Sequence[float] = (2.0, 4.0, 8.0), n_random: int = 10, select_frac: float = 0.5,
                     seed: int = 0, batch_size: int = 16, progress: bool = True,
                     failed_pool: Sequence[Any] = (), units_dir: str | Path | None = None, executor: Any = None,
                     retries: int = 1) -> HeadExperimentResult:
    """Run the protocol above. ``general``: probe and consistent samples for the general-ability control;
    ``failed_pool``: extra conflict samples searched for failures to amplify (their ids must not be in
    ``conflict``). The table's ``failed`` rows count the failed samples amplified per condition.

    ``units_dir``: run each phase as resumable work units (:mod:`modality_circuits.sweeps.units`) under
    ``units_dir/{scores,block,pool,amplify}``, by ``executor`` (local, Ray or Slurm); a rerun skips finished units."""
    if n_random < 1:
        raise InterventionError(f"n_random must be >= 1, got {n_random}.")
    for a in alphas:
        if not a > 0:
            raise InterventionError(f"Amplification factors must be > 0, got {a}.")
    clash = {s.id for s in conflict} & {s.id for s in failed_pool}
    if clash:
        raise InterventionError(f"failed_pool shares {len(clash)} sample id(s) with the conflict samples (e.g. "
                                f"{sorted(clash)[:3]}); the pool must be disjoint from the head-selection split. "
                                "Give the pool samples their own ids.")
    sel_split, eval_split = split_samples(list(conflict), select_frac, seed)
    logger.info("head selection on %d samples, evaluation on %d disjoint samples", len(sel_split), len(eval_split))
    baseline = mean_z(model, list(sel_split), batch_size) if mode == "mean" else None
    units = {"dir": units_dir, "executor": executor, "retries": retries}
    scores = head_scores(model, sel_split, method=method, mode=mode, batch_size=batch_size, baseline=baseline,
                         progress=progress, units_dir=None if units_dir is None else Path(units_dir) / "scores",
                         retries=retries, executor=executor)
    selected = select_heads(score_matrix(scores, select_condition), pct)
    randoms = random_head_sets(model.cfg.n_layers, model.cfg.n_heads, len(selected), n_random, seed + 1)

    rows: list[dict] = []

    def add(condition: str, measure: str, intervention: str, heads: str, per_sample: torch.Tensor | None,
            n: int, alpha: float = float("nan"), draw: int = -1, value: float | None = None) -> None:
        """One row; ``value`` is the mean of ``per_sample`` (``[n]`` booleans) with its bootstrap interval."""
        lo = hi = float("nan")
        if per_sample is not None:
            v = per_sample.float().cpu().numpy()
            value = float(v.mean()) if v.size else float("nan")
            lo, hi = bootstrap_ci(v, seed=seed)
        rows.append({"condition": condition, "measure": measure, "intervention": intervention, "heads": heads,
                     "alpha": alpha, "draw": draw, "value": value, "ci_low": lo, "ci_high": hi, "n": n})

    sets = [("selected", -1, selected)] + [("random", i, r) for i, r in enumerate(randoms)]
    nan = float("nan")
    params = {"seed": seed, "pct": pct, "method": method, "mode": mode, "select_frac": select_frac,
              "select_condition": select_condition, "sets": [list(map(list, hs)) for _, _, hs in sets]}
    # 1. every evaluation and general-ability sample, unchanged and with each head set blocked
    block_cfgs: list[tuple[dict, list[Intervention]]] = [({"heads": "none", "draw": -1, "alpha": nan}, [])] + [
        ({"heads": name, "draw": draw, "alpha": nan}, [ScaleHeads(hs, 0.0, baseline=baseline)])
        for name, draw, hs in sets]
    evals = [s for s in eval_split if s.follow in ("image", "text")] + list(general)
    blocked = _follow_table(model, evals, block_cfgs, batch_size, units, "block", params)
    # 2. the failed samples (evaluation split, then the pool), amplified by each set and factor
    pool = [s for s in failed_pool if s.follow in ("image", "text")]
    pool_base = _follow_table(model, pool, block_cfgs[:1], batch_size, units, "pool", params)
    failed: dict[str, list[Any]] = {}
    for cond in ("image", "text"):
        ev = [s for s in eval_split if s.follow == cond]
        pl = [s for s in pool if s.follow == cond]
        failed[cond] = [s for s, ok in zip(ev, _pick(blocked, ev, heads="none").tolist()) if not ok] + [
            s for s, ok in zip(pl, _pick(pool_base, pl, heads="none").tolist()) if not ok]
    amp_cfgs = [({"heads": name, "draw": draw, "alpha": float(a)}, [ScaleHeads(hs, a)])
                for name, draw, hs in sets for a in alphas]
    amplified = _follow_table(model, failed["image"] + failed["text"], amp_cfgs, batch_size, units, "amplify",
                              {**params, "alphas": list(alphas)})

    for cond in ("image", "text"):
        ev = [s for s in eval_split if s.follow == cond]
        if not ev:
            continue
        add(cond, "mfr", "none", "none", _pick(blocked, ev, heads="none"), len(ev))
        n_pool = sum(s.follow == cond for s in pool)
        add(cond, "failed", "none", "none", None, len(ev) + n_pool, value=float(len(failed[cond])))
        if not failed[cond]:
            logger.warning("condition %s: no failed samples to amplify (all %d follow the instruction); "
                           "restore rates are not defined", cond, len(ev) + n_pool)
        for name, draw, _ in sets:
            add(cond, "mfr", "block", name, _pick(blocked, ev, heads=name, draw=draw), len(ev), draw=draw)
            for a in alphas:
                if failed[cond]:
                    amp = _pick(amplified, failed[cond], heads=name, draw=draw, alpha=float(a))
                    add(cond, "restored", "amplify", name, amp, len(failed[cond]), alpha=a, draw=draw)
                else:
                    add(cond, "restored", "amplify", name, None, 0, alpha=a, draw=draw, value=nan)
    for kind in sorted({s.kind for s in general}):
        g = [s for s in general if s.kind == kind]
        add(kind, "accuracy", "none", "none", _pick(blocked, g, heads="none"), len(g))
        for name, draw, _ in sets:
            add(kind, "accuracy", "block", name, _pick(blocked, g, heads=name, draw=draw), len(g), draw=draw)
    return HeadExperimentResult(pd.DataFrame(rows), scores, selected, randoms,
                                {"selection": [s.id for s in sel_split], "evaluation": [s.id for s in eval_split]})
