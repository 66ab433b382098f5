"""The analysis stages of ``modality-circuits`` (each writes tidy CSV/JSON into the run directory)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModalityCircuitsError

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

from .run import (
    HEAD_METHODS,
    Run,
    _csv_list,
    executor_for,
    parse_edges,
    parse_layers,
    parse_variants,
    usable_for_lens,
    with_random_controls,
)


# ================================================================================================ stages
def stage_evaluate(run: Run, model: HookedMLLM, conflict: list, general: list, args: argparse.Namespace) -> dict:
    """MFR per condition (closed and open form) and general-ability accuracy on the analysed samples.

    Writes ``evaluate.json``, ``mfr.csv`` (per-sample scores) and ``generations.csv`` (greedy answers, classified).
    """
    from ..evaluation import evaluate_samples

    if run.skip("mfr"):
        return run.results.get("evaluate", {})
    with run.stage("mfr") as info:
        ev, df, gen = evaluate_samples(model, conflict + general, batch_size=args.batch_size, progress=not run.quiet,
                                       units_dir=run.out / "units" / "mfr", executor=executor_for(args))
        run.csv(df, "mfr.csv")
        run.csv(gen, "generations.csv")
        run.json(ev, "evaluate.json")
        run.results["evaluate"] = ev
        info["summary"] = accuracy_line(ev)
    return ev


def accuracy_line(ev: dict) -> str:
    from ..data.sample import CONDITION_LABELS as names

    line = "; ".join(f"{names.get(k, k)} {v['accuracy']:.3f} ({v['failures']} failed of "
                     f"{v.get('n', '?')})" for k, v in ev.items() if isinstance(v, dict) and "accuracy" in v)
    vr = ev.get("no_instruction") or {}
    if vr:
        line += f"; no instruction: vision ratio {vr['closed']:.3f} closed / " + (
            f"{vr['open']:.3f} open" if vr.get("open") is not None else "– open")
    return line


def balanced_subset(samples: list, n: int) -> list:
    """The first ``n // 2`` samples of each instructed modality (``n`` odd: one more image-following sample), in
    their original order; ``n <= 0`` or ``n >= len(samples)``: all of them."""
    if n <= 0 or n >= len(samples):
        return list(samples)
    quota = {"image": n - n // 2, "text": n // 2}
    out = []
    for s in samples:
        if quota.get(s.follow, 0) > 0:
            quota[s.follow] -= 1
            out.append(s)
    return out


def variant_knockouts(model: HookedMLLM, conflict: list, edges: list, variants: list[str], args: argparse.Namespace,
                      progress: bool, original: Any, units: Path | None = None) -> Any:
    """The position control: the edges that touch the instruction or the constraint, rerun on each prompt variant
    (:mod:`modality_circuits.data.variants`) for ``args.variant_n`` samples (:func:`balanced_subset`; 0: all) at
    every ``args.variant_every``-th knockout window centre; one table with a ``variant`` column, the original
    layout's rows for the same samples, edges and centres included."""
    import pandas as pd

    from ..data.variants import apply_variant
    from ..sweeps.knockout import knockout_sweep

    every = getattr(args, "variant_every", None) or 1
    touched = [e for e in edges if {"instruction", "constraint"} & set(e)]
    names = {f"{a}↛{b}" for a, b in touched}
    usable = [s for s in conflict if s.instruction and s.constraint]  # the samples every layout can be built from
    usable = balanced_subset(usable, getattr(args, "variant_n", None) or 0)
    centers = sorted(set(original["layer"]))[::every]
    ids = {s.id for s in usable}
    parts = [original[original["edge"].isin(names) & original["sample_id"].isin(ids)
                      & original["layer"].isin(centers)].assign(variant="original")]
    for v in variants:
        d = knockout_sweep(model, apply_variant(usable, v), edges=touched, centers=centers, window=args.window,
                           window_mode=args.window_mode, batch_size=args.batch_size, first_token=args.first_token,
                           metric=args.metric, progress=progress, seed=args.seed,
                           units_dir=None if units is None else units / f"knockout-{v}", executor=executor_for(args))
        parts.append(d.assign(variant=v))
    return pd.concat(parts, ignore_index=True)


def available_edges(model: HookedMLLM, conflict: list, edges: Any) -> list:
    """The default edges whose groups the prompts have (a chat template without a system prompt has no ``system``
    group: LLaVA-1.5-hf's, SmolVLM's); the others are left out with a warning. Explicit ``--edges`` are not
    filtered (a missing group there is an error)."""
    names = set(model.prepare(conflict[:1]).spans.names) if conflict else set()
    keep = [e for e in edges if set(e) <= names]
    dropped = [f"{a}↛{b}" for a, b in edges if (a, b) not in keep]
    if dropped:
        logger.warning("the prompts have no %s group: default edge(s) %s left out",
                       " / ".join(sorted({g for e in edges for g in e} - names)), ", ".join(dropped))
    return keep


def knockout_tables(write_csv: Any, df: Any, edges: list, seed: int) -> dict:
    """Write ``knockout.csv``, ``knockout_summary.csv`` (bootstrap CIs) and ``knockout_stability.csv`` (data-ratio
    control, no forward passes) with ``write_csv(frame, name)``; returns the run's ``results["knockout"]``."""
    from ..stats import summarize
    from ..sweeps.stability import subset_stability

    write_csv(df, "knockout.csv")
    s = summarize(df, "delta", ["condition", "edge", "layer"])
    write_csv(s, "knockout_summary.csv")
    worst = {}
    for cond, g in s.groupby("condition"):
        r = g.loc[g["mean"].idxmin()]
        worst[cond] = {"edge": r["edge"], "layer": int(r["layer"]), "mean_delta": round(float(r["mean"]), 4)}
    st = subset_stability(df, seed=seed)
    write_csv(st, "knockout_stability.csv")
    return {"n_rows": len(df), "edges": [f"{a}↛{b}" for a, b in edges], "largest_drop": worst,
            "stability_median_r": {f"{f:g}": round(float(v), 4)
                                   for f, v in st.groupby("fraction")["pearson_r"].median().items()}}


def knockout_line(res: dict, df: Any) -> str:
    return (f"{len(res['edges'])} edges × {df['layer'].nunique()} layers × {df['sample_id'].nunique()} samples; "
            "largest drop: " + "; ".join(f"{c}: {w['edge']} @ layer {w['layer']} ({100 * w['mean_delta']:+.1f}%)"
                                         for c, w in res["largest_drop"].items()))


def stage_knockout(run: Run, model: HookedMLLM, conflict: list, args: argparse.Namespace) -> Any:
    """The knockout sweep as work units under ``units/knockout`` (an interrupted stage resumes unit by unit;
    ``--shard I/N`` runs one part, and the shard that completes the set, or ``merge``, writes the tables)."""
    from ..sweeps.knockout import DEFAULT_EDGES, knockout_sweep
    from ..sweeps.units import parse_shard

    if run.skip("knockout"):
        return None
    shard = parse_shard(getattr(args, "shard", None))
    with run.stage("knockout") as info:
        variants = parse_variants(getattr(args, "variants", None))  # checked before the sweep, not after it
        if shard[1] > 1 and variants:
            logger.warning("--shard: the prompt-variant reruns (--variants) are not sharded and are skipped; run "
                           "them in a knockout run of their own")
            variants = []
        edges = parse_edges(args.edges) or available_edges(model, conflict, DEFAULT_EDGES)
        edges = with_random_controls(edges, getattr(args, "random_sets", None) or 0)
        df = knockout_sweep(model, conflict, edges=edges, centers=parse_layers(args.centers, model.cfg.n_layers),
                            window=args.window, window_mode=args.window_mode, batch_size=args.batch_size,
                            first_token=args.first_token, metric=args.metric, progress=not run.quiet,
                            seed=args.seed, units_dir=run.out / "units" / "knockout", shard=shard,
                            executor=executor_for(args))
        if df is None:  # other shards' units are still missing
            from ..sweeps.units import UnitStore

            pr = UnitStore.open(run.out / "units" / "knockout").progress()
            eta = f", about {pr['eta_s']:.0f} s of one worker's time left" if pr["eta_s"] is not None else ""
            info["summary"] = (f"shard {shard[0]}/{shard[1]} done; {pr['done']} of {pr['total']} units done over all "
                               f"shards{eta}; the part that completes the set (or `modality-circuits merge "
                               f"{run.out}`) writes the tables")
            info["status"] = "partial"
            return None
        run.results["knockout"] = knockout_tables(run.csv, df, edges, args.seed)
        if variants:
            vdf = variant_knockouts(model, conflict, edges, variants, args, progress=not run.quiet, original=df,
                                    units=run.out / "units")
            run.csv(vdf, "knockout_variants.csv")
            run.results["knockout"]["variants"] = sorted(set(vdf["variant"]))
        info["summary"] = knockout_line(run.results["knockout"], df)
    return df


def stage_contributions(run: Run, model: HookedMLLM, conflict: list, args: argparse.Namespace) -> Any:
    from ..lens import contributions

    if run.skip("contributions"):
        return None
    with run.stage("contributions") as info:
        df = contributions(model, usable_for_lens(model, conflict), batch_size=args.batch_size,
                           progress=not run.quiet)
        run.csv(df, "contributions.csv")
        tot = df[df["kind"] != "embed"].groupby(["condition", "kind", "sample_id"])["contribution"].sum() \
            .groupby(["condition", "kind"]).mean()
        run.results["contributions"] = {f"{c}/{k}": round(float(v), 4) for (c, k), v in tot.items()}
        info["summary"] = "mean total contribution " + "; ".join(
            f"{c}: attn {tot.get((c, 'attn'), float('nan')):+.2f}, mlp {tot.get((c, 'mlp'), float('nan')):+.2f}"
            for c in sorted({c for c, _ in tot.index}))
    return df


def stage_anchors(run: Run, model: HookedMLLM, conflict: list, args: argparse.Namespace) -> Any:
    from ..lens import anchor_readout

    if run.skip("anchors"):
        return None
    with run.stage("anchors") as info:
        groups = _csv_list(args.groups) or ["instruction", "last"]
        df = anchor_readout(model, usable_for_lens(model, conflict), groups=groups, batch_size=args.batch_size,
                            progress=not run.quiet)
        run.csv(df, "anchors.csv")
        best, best_ldar = {}, {}
        for (cond, g), d in df.groupby(["condition", "group"]):
            r = d.loc[d["agreement"].idxmax()]
            best[f"{cond}/{g}"] = {"layer": int(r["layer"]), "agreement": round(float(r["agreement"]), 4)}
            r = d.loc[d["ldar"].idxmax()]
            best_ldar[f"{cond}/{g}"] = {"layer": int(r["layer"]), "ldar": round(float(r["ldar"]), 4),
                                        "ci": [round(float(r["ldar_low"]), 4), round(float(r["ldar_high"]), 4)]}
        run.results["anchors"] = {"best_agreement": best, "best_ldar": best_ldar}
        info["summary"] = "best LDAR " + "; ".join(f"{k} {v['ldar']:.2f} @ layer {v['layer']}"
                                                   for k, v in best_ldar.items())
    return df


def failed_pool(model: HookedMLLM, args: argparse.Namespace) -> list:
    """``--n-failed-pool`` extra seeded synthetic conflict samples (own ids, own seed) searched for failures to
    amplify; empty for JSON data, whose samples are all in the analysis already."""
    import dataclasses

    from ..data import synthetic

    n = args.n_failed_pool  # >= 0, checked by cli.main
    if n == 0 or args.data not in (None, "synthetic"):
        return []
    size = model.image_encoder.native_image_size or 32
    return [dataclasses.replace(s, id=f"pool-{s.id}")
            for s in synthetic(n, seed=args.seed + 7919, kind="conflict", image_size=size,
                               distractors=getattr(args, "distractors", None) or 0)]


def stage_heads(run: Run, model: HookedMLLM, conflict: list, general: list, args: argparse.Namespace) -> Any:
    import pandas as pd

    from ..sweeps.head_experiment import heads_experiment
    from ..sweeps.heads import head_scores, score_matrix, select_heads

    conflict = usable_for_lens(model, conflict)
    if run.skip("heads"):
        if not run.skip("attention views"):  # rebuilt from the kept selection
            sel = json.loads((run.out / "heads_selection.json").read_text())
            chosen = set(sel["split"]["selection"])
            stage_attention_views(run, model, [s for s in conflict if s.id not in chosen] or conflict,
                                  sel["ranked"][:args.top_heads], args)
        return None
    with run.stage("heads") as info:
        cond = None if args.select_condition == "both" else args.select_condition
        res = heads_experiment(model, conflict, general, pct=args.pct, method=args.method, select_condition=cond,
                               mode=args.mode, alphas=_csv_list(args.alphas, float), n_random=args.n_random,
                               select_frac=args.select_frac, seed=args.seed, batch_size=args.batch_size,
                               progress=not run.quiet, failed_pool=failed_pool(model, args),
                               units_dir=run.out / "units" / "heads", executor=executor_for(args))
        sel_ids = set(res.split["selection"])
        sel_samples = [s for s in conflict if s.id in sel_ids]
        tables = [res.scores]
        for m in _csv_list(args.heatmap_methods):
            if m not in HEAD_METHODS:
                raise ModalityCircuitsError(f"--heatmap-methods: unknown method {m!r}; choose from {HEAD_METHODS}.")
            if m != args.method:
                tables.append(head_scores(model, sel_samples, method=m, mode=args.mode, batch_size=args.batch_size,
                                          progress=not run.quiet, units_dir=run.out / "units" / f"heads-{m}",
                                          executor=executor_for(args)))
        run.csv(pd.concat(tables, ignore_index=True), "head_scores.csv")
        run.csv(res.table, "heads_table.csv")
        summary = res.summary()
        run.csv(summary, "heads_summary.csv")
        sizes = {k: len(v) for k, v in res.split.items()}
        ranked = select_heads(score_matrix(res.scores, cond), 100.0)  # every head, best first
        run.json({"selected": res.selected, "ranked": ranked[:max(args.top_heads, 20)],
                  "random_sets": res.random_sets, "split_sizes": sizes,
                  "split": res.split, "method": args.method, "pct": args.pct, "n_random": args.n_random,
                  "mode": args.mode, "alphas": _csv_list(args.alphas, float)}, "heads_selection.json")
        blocked = {}
        for c in ("image", "text"):
            t = summary[(summary["condition"] == c) & (summary["measure"] == "mfr")]
            if t.empty:
                continue
            base = t[t["intervention"] == "none"]["value"]
            blk = t[t["intervention"] == "block"]
            if len(base) and len(blk):
                blocked[c] = {"mfr": round(float(base.iloc[0]), 4), "blocked": round(float(blk["value"].iloc[0]), 4),
                              "random_mean": round(float(blk["random_mean"].iloc[0]), 4)}
        run.results["heads"] = {"selected": res.selected, "split_sizes": sizes, "blocking": blocked}
        info["summary"] = (f"selected {len(res.selected)} head(s) " + ", ".join(f"L{a}.H{b}" for a, b in res.selected)
                           + f" on {sizes['selection']} samples; blocking on {sizes['evaluation']}: " + "; ".join(
                               f"{c} MFR {v['mfr']:.2f}→{v['blocked']:.2f} (random {v['random_mean']:.2f})"
                               for c, v in blocked.items()))
    stage_attention_views(run, model, [s for s in conflict if s.id not in sel_ids] or conflict,
                          ranked[:args.top_heads], args)
    return res


def stage_attention_views(run: Run, model: HookedMLLM, samples: list, heads: list, args: argparse.Namespace) -> None:
    """circuitsvis views of ``heads`` (the top heads by score) and attention over the image, one sample per
    condition (from the evaluation split)."""
    from ..errors import ModalityCircuitsError as MCE
    from ..viz.attention import attention_view_props
    from ..viz.image_attention import image_attention_maps

    with run.stage("attention views") as info:
        picks = [next((s for s in samples if s.follow == c), None) for c in ("image", "text")]
        picks = [s for s in picks if s is not None]
        top = [tuple(h) for h in heads]
        views, maps = [], []
        if picks:
            batch = model.prepare(picks)
            for i, s in enumerate(picks):
                if top:
                    p = attention_view_props(model, batch, i, top)
                    p["_title"] = (f"{s.id} ({'vision' if s.follow == 'image' else 'text'}-following): the "
                                  f"{len(top)} top-scoring heads")
                    views.append(p)
                specs = [("instruction", None, None), ("last", None, None)]
                if top:
                    specs.append(("last", top[0][0], top[0][1]))
                try:
                    maps += [m.to_dict() for m in image_attention_maps(model, batch, i, specs)]
                except MCE as e:
                    logger.warning("attention over the image skipped for %s: %s", s.id, e)
        run.json(views, "attention_views.json")
        run.json(maps, "image_attention.json")
        info["summary"] = f"{len(views)} attention view(s), {len(maps)} image attention map(s)"


def stage_report(run: Run, png: bool = True) -> Path:
    from ..report import build_report

    with run.stage("report") as info:
        path = build_report(run.out, png=png)
        info["summary"] = f"wrote {path}"
    return path




def _image_donors(samples: list) -> tuple[list, list]:
    """Pairs (sample, donor) of vision-following samples with the same task and a different image answer."""
    out_s, out_d = [], []
    vis = [s for s in samples if s.follow == "image"]
    for s in vis:
        d = next((x for x in vis if x.task == s.task and x.answer_img != s.answer_img and x is not s), None)
        if d is not None:
            out_s.append(s)
            out_d.append(d)
    return out_s, out_d


def stage_patching(run: Run, model: HookedMLLM, conflict: list, args: argparse.Namespace) -> Any:
    """Activation patching of the residual stream by token group for the instruction-flip pair, and path
    patching image → {instruction, last} residual per layer for the image-swap pair (every ``--patch-every``-th
    layer).

    Writes ``patching_flip.csv`` (layer × group, 1 = clean restored) and ``path_patching.csv``.
    """

    from ..patching.units import flip_patching, image_path_patching

    n = int(getattr(args, "n_patch", 0) or 0)
    if n <= 0 or run.skip("patching"):
        return None
    with run.stage("patching") as info:
        usable = usable_for_lens(model, conflict)
        half = max(1, n // 2)
        picked = [s for s in usable if s.follow == "image"][:half] + [s for s in usable if s.follow == "text"][:half]
        every = getattr(args, "patch_every", None) or 1
        ex, units = executor_for(args), run.out / "units"
        flip = flip_patching(model, picked, range(0, model.cfg.n_layers, every), per_unit=None if ex is None else 1,
                             units_dir=units / "patching-flip", executor=ex)
        flip["pair"] = "instruction_flip"
        run.csv(flip, "patching_flip.csv")
        vs, ds = _image_donors(usable[: 4 * n])
        path = image_path_patching(model, vs[:n], ds[:n], range(1, model.cfg.n_layers + 1, every),
                                   units_dir=units / "patching-path", executor=ex)
        run.csv(path, "path_patching.csv")
        top = flip.loc[flip["value"].idxmax()] if len(flip) else None
        run.results["patching"] = {
            "n_flip": len(picked), "n_image_swap": int(path["n"].iloc[0]) if len(path) else 0,
            "flip_best": None if top is None else {"layer": int(top["layer"]), "group": str(top["group"]),
                                                   "restored": round(float(top["value"]), 4)},
            "path_effect": {f"{r.receiver}@{r.layer}": round(r.effect, 4) for r in path.itertuples()}}
        info["summary"] = (f"instruction flip ({len(picked)} pairs): best restoring patch {top['group']} @ layer "
                           f"{int(top['layer'])} ({float(top['value']):.2f})" if top is not None else "no pairs")
        if len(path):
            last = path[path["receiver"] == "last"]["effect"].max()
            ins = path[path["receiver"] == "instruction"]["effect"].max()
            info["summary"] += f"; image path effect via last {last:.2f}, via instruction {ins:.2f}"
    return flip
