"""Evaluation of a model on a sample set: MFR per condition (closed and open form) and general-ability accuracy.

One path for every caller (``modality-circuits evaluate`` on synthetic held-out sets or on a JSON file, and the
``mfr`` stage of ``reproduce``): closed form from full-answer log-probabilities
(:func:`~modality_circuits.metrics.score_dataset`), open form from greedy generations matched against the answers
(:func:`~modality_circuits.metrics.generations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .data.synthetic import synthetic
from .metrics import generations, score_dataset

if TYPE_CHECKING:
    from .models.hooked_mllm import HookedMLLM

#: Held-out evaluation seed for synthetic sets (training uses ToyConfig.seed's stream).
EVAL_SEED = 10_007
#: The evaluation sets, in report order.
SETS = ("conflict_follow_image", "conflict_follow_text", "consistent", "image_probe", "text_probe")


def summarize_accuracy(df: pd.DataFrame) -> dict:
    """Per evaluation set: ``accuracy``, ``failures``, ``n`` and ``by_task`` from a per-sample score table
    (:meth:`~modality_circuits.metrics.FollowingScores.to_frame` with samples)."""
    out: dict[str, Any] = {}
    groups = [("conflict_follow_image", (df["kind"] == "conflict") & (df["follow"] == "image")),
              ("conflict_follow_text", (df["kind"] == "conflict") & (df["follow"] == "text"))]
    groups += [(k, df["kind"] == k) for k in ("consistent", "image_probe", "text_probe")]
    for name, m in groups:
        d = df[m]
        if d.empty:
            continue
        out[name] = {"accuracy": round(float(d["followed"].mean()), 4), "failures": int((~d["followed"]).sum()),
                     "n": int(len(d)),
                     "by_task": {t: round(float(g["followed"].mean()), 4) for t, g in d.groupby("task")}}
    return out


def vision_ratio(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 32, progress: bool = True) -> dict:
    """MC²'s **vision ratio** without any modality instruction: the conflict samples with their instruction removed,
    the share of image answers among image-or-text answers.

    Returns ``{"closed", "closed_ci", "open", "open_image", "open_text", "open_other", "n"}``: closed form, the share
    of samples whose image answer out-scores the text answer (with its bootstrap 95% interval); open form, greedy
    generations matched against both answers, ``open = image / (image + text)`` (answers matching neither are
    counted in ``open_other`` and left out of the ratio, as MC² does). ``{}`` without conflict samples.
    """
    import dataclasses


    bare = [dataclasses.replace(s, instruction=None, follow="image", id=f"noinstr-{s.id}")
            for s in samples if s.kind == "conflict"]
    if not bare:
        return {}
    image_first = score_dataset(model, bare, batch_size=batch_size, progress=progress).followed.float().numpy()
    gen = generations(model, bare, batch_size=batch_size, progress=progress)
    return _vision_ratio(image_first, gen["outcome"])


def _vision_ratio(image_first: Any, outcomes: pd.Series) -> dict:
    """The vision-ratio summary from per-sample closed-form results (1 = image answer first) and open-form outcomes
    (``follow`` = the image answer, as the bare samples follow the image)."""
    from .stats import bootstrap_ci

    n_img, n_txt = int((outcomes == "follow").sum()), int((outcomes == "competitor").sum())
    lo, hi = bootstrap_ci(image_first)
    return {"closed": round(float(image_first.mean()), 4), "closed_ci": [round(lo, 4), round(hi, 4)],
            "open": round(n_img / (n_img + n_txt), 4) if n_img + n_txt else None, "open_image": n_img,
            "open_text": n_txt, "open_other": int(len(outcomes) - n_img - n_txt), "n": len(outcomes)}


def evaluation_rows(model: HookedMLLM, chunk: Sequence[Any], *, no_instruction: bool = True) -> pd.DataFrame:
    """One row per sample of ``chunk`` (one work unit, one forward batch): the closed-form scores
    (:meth:`~modality_circuits.metrics.FollowingScores.to_frame`), and for conflict samples the greedy generation
    and its outcome, and (``no_instruction``) the same without the instruction (``bare_image_first``,
    ``bare_generation``, ``bare_outcome``)."""
    import dataclasses

    chunk = list(chunk)
    df = score_dataset(model, chunk, batch_size=len(chunk), progress=False).to_frame(chunk)
    for col in ("generation", "outcome", "bare_generation", "bare_outcome"):
        df[col] = pd.Series([None] * len(df), dtype=object)
    df["bare_image_first"] = pd.Series([None] * len(df), dtype=object)
    idx = [i for i, s in enumerate(chunk) if s.kind == "conflict"]
    if not idx:
        return df
    conflict = [chunk[i] for i in idx]
    gen = generations(model, conflict, batch_size=len(conflict), progress=False)
    df.loc[idx, "generation"] = gen["generation"].to_numpy()
    df.loc[idx, "outcome"] = gen["outcome"].to_numpy()
    if no_instruction:
        bare = [dataclasses.replace(s, instruction=None, follow="image", id=f"noinstr-{s.id}") for s in conflict]
        first = score_dataset(model, bare, batch_size=len(bare), progress=False).followed.cpu().numpy()
        bgen = generations(model, bare, batch_size=len(bare), progress=False)
        df.loc[idx, "bare_image_first"] = [bool(x) for x in first]
        df.loc[idx, "bare_generation"] = bgen["generation"].to_numpy()
        df.loc[idx, "bare_outcome"] = bgen["outcome"].to_numpy()
    return df


def evaluate_samples(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 32, progress: bool = True,
                     no_instruction: bool = True, units_dir: str | Path | None = None, executor: Any = None,
                     retries: int = 1) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """``(summary, per-sample scores, generations)`` of a sample set; the summary adds the open form
    (``{"mfr", "competitor", "other", "n"}``) to each conflict condition and, with ``no_instruction``, the
    vision ratio of the conflict samples without their instruction (MC²'s: closed form, the share of samples whose
    image answer out-scores the text answer, with its bootstrap 95% interval; open form, ``image / (image + text)``
    among greedy answers, those matching neither counted in ``open_other``; key ``"no_instruction"``).

    ``units_dir`` / ``executor``: as resumable work units of ``batch_size`` samples
    (:func:`~modality_circuits.sweeps.units.sweep_in_units`; :func:`evaluation_rows` per unit).
    """
    from .sweeps.units import sweep_in_units

    samples = list(samples)
    rows = sweep_in_units(model, samples, evaluation_rows, {"no_instruction": no_instruction},
                          {"sweep": "evaluate", "no_instruction": no_instruction}, units_dir, batch_size, None,
                          retries, progress, "MFR and generations", executor)
    scores = rows[["sample_id", "follow", "task", "kind", "logp_follow", "logp_comp", "p_binary", "p_follow",
                   "p_comp", "followed"]].reset_index(drop=True)
    ev = summarize_accuracy(scores)
    conf = rows[rows["kind"] == "conflict"].reset_index(drop=True)
    gen = pd.DataFrame({"sample_id": conf["sample_id"], "condition": conf["follow"], "task": conf["task"],
                        "generation": conf["generation"], "outcome": conf["outcome"]})
    for cond in ("image", "text"):
        g = gen[gen["condition"] == cond]
        if len(g) and f"conflict_follow_{cond}" in ev:
            ev[f"conflict_follow_{cond}"]["open_form"] = {
                k: round(float((g["outcome"] == o).mean()), 4) for k, o in
                (("mfr", "follow"), ("competitor", "competitor"), ("other", "other"))} | {"n": int(len(g))}
    if no_instruction and len(conf):
        ev["no_instruction"] = _vision_ratio(conf["bare_image_first"].astype(float).to_numpy(), conf["bare_outcome"])
    return ev, scores, gen


def synthetic_sets(n: int, seed: int = EVAL_SEED, image_size: int = 32, distractors: int = 0) -> list[Any]:
    """The five held-out synthetic sets (``n`` each, seeds ``seed … seed+4``), concatenated in :data:`SETS` order;
    ``distractors`` extra context sentences (:func:`~modality_circuits.data.synthetic.context_sentence`)."""
    kw = {"image_size": image_size, "distractors": distractors}
    return (synthetic(n, seed=seed, kind="conflict", follow="image", **kw)
            + synthetic(n, seed=seed + 1, kind="conflict", follow="text", **kw)
            + synthetic(n, seed=seed + 2, kind="consistent", **kw)
            + synthetic(n, seed=seed + 3, kind="image_probe", **kw)
            + synthetic(n, seed=seed + 4, kind="text_probe", **kw))


def evaluate_model(model: HookedMLLM, n: int = 200, seed: int = EVAL_SEED, batch_size: int = 50, progress: bool = True,
                   image_size: int | None = None, distractors: int = 0, frames: bool = False
                   ) -> dict | tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Accuracies on fresh held-out synthetic sets (``n`` per set): the model card's numbers. ``frames=True``:
    ``(summary, per-sample scores, generations)`` as :func:`evaluate_samples` gives them."""
    size = image_size or model.image_encoder.native_image_size or 32
    ev, scores, gen = evaluate_samples(model, synthetic_sets(n, seed, size, distractors), batch_size, progress)
    ev = {"n_per_condition": n, "seed": seed, "distractors": distractors, **ev}
    return (ev, scores, gen) if frames else ev
