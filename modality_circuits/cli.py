"""``modality-circuits``: the command line (the main job ``reproduce``, and one command per analysis).

::

    modality-circuits reproduce            # MFR -> knockout -> contributions -> anchors -> heads -> report
    modality-circuits evaluate             # MFR per condition, probe accuracy, failure counts
    modality-circuits knockout | contributions | anchors | heads
    modality-circuits train-toy --out DIR  # train the toy model, write its model card
    modality-circuits report RESULTS_DIR   # rebuild the HTML report

Defaults: the shipped toy model (``assets/toy-llava``) and seeded synthetic data; ``--data FILE.json --images
COCO_DIR`` analyses a Modality-Following (MC²) file instead. Every command writes tidy CSVs, JSON summaries and a
``manifest.json`` (versions, model sha256, seed, arguments, stage timings) to ``--out``. Same seed, same numbers.
Bad input exits with status 2 and one ``error: …`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ModalityCircuitsError

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: The shipped toy model (``assets/toy-llava`` next to the package).
DEFAULT_MODEL = PACKAGE_ROOT / "assets" / "toy-llava"
DTYPES = ("float32", "bfloat16", "float16")
HEAD_METHODS = ("ablation", "attribution", "dla", "attention")


def default_model_path() -> Path:
    """The shipped toy model's directory (``assets/toy-llava``)."""
    return DEFAULT_MODEL


# ============================================================================================ run context
class Run:
    """One command's output directory, stage timings, one-line stage summaries and manifest."""

    def __init__(self, args: argparse.Namespace, command: str):
        self.args, self.command = args, command
        self.out = Path(args.out or Path("runs") / command)
        self.out.mkdir(parents=True, exist_ok=True)
        self.quiet = bool(getattr(args, "quiet", False))
        self.timings: dict[str, float] = {}
        self.t0 = time.time()
        arguments = {k: v for k, v in vars(args).items() if k != "func"}
        self.manifest: dict[str, Any] = {"command": command, "argv": sys.argv[1:], "args": _jsonable(arguments),
                                         "seed": getattr(args, "seed", None), "started": _now(),
                                         "versions": versions(), "timings": self.timings}
        self.results: dict[str, Any] = {}

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time a stage; the body may set ``info["summary"]`` (printed as one line)."""
        info: dict[str, Any] = {}
        t = time.time()
        yield info
        dt = time.time() - t
        self.timings[name] = round(dt, 2)
        self.say(f"[{name}] {info.get('summary', 'done')} ({dt:.1f} s)")
        self.write_manifest()

    def csv(self, df: Any, name: str) -> None:
        df.to_csv(self.out / name, index=False)

    def json(self, obj: Any, name: str) -> None:
        (self.out / name).write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False))

    def write_manifest(self, final: bool = False) -> None:
        self.manifest["results"] = self.results
        if final:
            self.manifest["finished"] = _now()
            self.manifest["total_seconds"] = round(time.time() - self.t0, 2)
        self.json(self.manifest, "manifest.json")
        self.json(self.results, "results.json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and x != x:
        return None
    if callable(x):
        return getattr(x, "__name__", str(x))
    return x


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("modality_circuits", "torch", "transformers", "transformer_lens", "numpy", "pandas", "plotly",
                 "circuitsvis"):
        try:
            out[name] = version(name.replace("_", "-")) if name != "modality_circuits" else version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def sha256_weights(path: Path) -> dict[str, str]:
    """sha256 of every ``*.safetensors`` file of a checkpoint directory."""
    import hashlib

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch and ask torch for deterministic kernels (same seed -> same numbers)."""
    import os
    import random

    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ================================================================================================ inputs
def load_model(args: argparse.Namespace, run: Run | None = None) -> Any:
    """The HookedMLLM of ``--model`` (checked, with a clear error if missing)."""
    import torch

    from .models import HookedMLLM

    path = Path(args.model) if args.model else DEFAULT_MODEL
    if not path.exists():
        hint = " (the shipped toy model; train one with `modality-circuits train-toy --out DIR`)" \
            if path == DEFAULT_MODEL else ""
        raise FileNotFoundError(f"--model: model directory not found: {path}{hint}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModalityCircuitsError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu.")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = HookedMLLM.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device)
    if run is not None:
        cfg = json.loads((path / "config.json").read_text())
        run.manifest["model"] = {
            "path": str(path.resolve()), "architecture": (cfg.get("architectures") or ["?"])[0],
            "sha256": sha256_weights(path), "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
            "d_model": model.cfg.d_model, "dtype": args.dtype, "device": args.device,
            "image_tokens": getattr(model.image_encoder, "tokens_per_image", None)}
        run.manifest["torch_threads"] = torch.get_num_threads()
    return model


def load_data(args: argparse.Namespace, model: Any, run: Run | None = None) -> tuple[list, list]:
    """(conflict samples, general-ability samples) from ``--data`` (synthetic by default)."""
    from .data import load_mc2, synthetic

    if args.data in (None, "synthetic"):
        n = args.n if args.n is not None else 200
        if n < 4:
            raise ModalityCircuitsError(f"--n must be at least 4 (got {n}): both conditions and two splits need "
                                        "samples.")
        size = int(getattr(model.image_encoder, "image_size", 32))
        conflict = synthetic(n, seed=args.seed, kind="conflict", image_size=size)
        ng = args.n_general if args.n_general is not None else max(4, n // 4)
        general = [s for k, kind in enumerate(("consistent", "image_probe", "text_probe"))
                   for s in synthetic(ng, seed=args.seed + 1 + k, kind=kind, image_size=size)] if ng > 0 else []
        source = "synthetic"
    else:
        path = Path(args.data)
        if not path.is_file():
            raise FileNotFoundError(f"--data: data file not found: {path}")
        if not args.images:
            raise ModalityCircuitsError("--data FILE.json needs --images: the COCO 2014 folder with the photos.")
        if not Path(args.images).is_dir():
            raise FileNotFoundError(f"--images: image folder not found: {args.images}")
        conflict = load_mc2(path, args.images, question=args.question, limit=args.n)
        if len(conflict) < 4:
            raise ModalityCircuitsError(f"{path}: {len(conflict)} record(s); the analyses need at least 4.")
        general, source = [], str(path.resolve())
    if run is not None:
        run.manifest["data"] = {
            "source": source, "question": args.question if source != "synthetic" else None,
            "n_conflict": len(conflict), "n_general": len(general),
            "n_by_condition": {c: sum(s.follow == c for s in conflict) for c in ("image", "text")},
            "general_kinds": sorted({s.kind for s in general})}
    return conflict, general


def usable_for_lens(model: Any, samples: Sequence[Any]) -> list:
    """Samples whose two answers differ in their first token (needed by the first-token analyses)."""
    from .metrics import tokenize_answer

    keep = []
    for s in samples:
        try:
            if tokenize_answer(model.tokenizer, s.following_answer)[0] != \
                    tokenize_answer(model.tokenizer, s.competitor_answer)[0]:
                keep.append(s)
        except ModalityCircuitsError:
            pass
    if len(keep) < len(samples):
        logger.warning("%d of %d samples have answers sharing their first token; left out of the first-token "
                       "analyses", len(samples) - len(keep), len(samples))
    return keep


def _csv_list(text: str | None, cast: Any = str) -> list:
    return [] if not text else [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def parse_edges(text: str | None) -> list[tuple[str, str]] | None:
    """``"image->last,context->instruction"`` (``->``, ``↛`` or ``:``) -> ``[(src, dst), …]``."""
    if not text:
        return None
    edges = []
    for part in _csv_list(text):
        for sep in ("->", "↛", ":"):
            if sep in part:
                src, dst = (x.strip() for x in part.split(sep, 1))
                if src and dst:
                    edges.append((src, dst))
                    break
        else:
            raise ModalityCircuitsError(f"--edges: cannot parse {part!r}; write edges as src->dst, e.g. image->last.")
    return edges


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """``"0,2,5"`` or ``"3-7"`` -> layer list (None: all)."""
    if not text:
        return None
    out: list[int] = []
    for part in _csv_list(text):
        try:
            if "-" in part.strip("-"):
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ModalityCircuitsError(f"--layers: cannot parse {part!r}; use e.g. 0,2,5 or 3-7.") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise ModalityCircuitsError(f"--layers: {bad} out of range; the model has {n_layers} layers "
                                    f"(0..{n_layers - 1}).")
    return out


# ================================================================================================ stages
def stage_evaluate(run: Run, model: Any, conflict: list, general: list, args: argparse.Namespace) -> dict:
    """MFR per condition (closed and open form) and general-ability accuracy on the analysed samples.

    Writes ``evaluate.json``, ``mfr.csv`` (per-sample scores) and ``generations.csv`` (greedy answers, classified).
    """
    from .metrics import generations, score_dataset

    with run.stage("mfr") as info:
        samples = conflict + general
        scores = score_dataset(model, samples, batch_size=args.batch_size, progress=not run.quiet)
        df = scores.to_frame(samples)
        run.csv(df, "mfr.csv")
        ev = summarize_accuracy(df)
        gen = generations(model, conflict, batch_size=args.batch_size, progress=not run.quiet)
        run.csv(gen, "generations.csv")
        for cond in ("image", "text"):
            g = gen[gen["condition"] == cond]
            if len(g) and f"conflict_follow_{cond}" in ev:
                ev[f"conflict_follow_{cond}"]["open_form"] = {
                    "mfr": round(float((g["outcome"] == "follow").mean()), 4),
                    "competitor": round(float((g["outcome"] == "competitor").mean()), 4),
                    "other": round(float((g["outcome"] == "other").mean()), 4), "n": int(len(g))}
        run.json(ev, "evaluate.json")
        run.results["evaluate"] = ev
        info["summary"] = accuracy_line(ev)
    return ev


def summarize_accuracy(df: Any) -> dict:
    """``evaluate_model``-shaped summary (accuracy, failures, n, by_task) from a per-sample score table."""
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


def accuracy_line(ev: dict) -> str:
    names = {"conflict_follow_image": "MFR vision-following", "conflict_follow_text": "MFR text-following",
             "consistent": "consistent", "image_probe": "image probes", "text_probe": "text probes"}
    return "; ".join(f"{names.get(k, k)} {v['accuracy']:.3f} ({v['failures']} failed of "
                     f"{v.get('n', '?')})" for k, v in ev.items() if isinstance(v, dict) and "accuracy" in v)


def stage_knockout(run: Run, model: Any, conflict: list, args: argparse.Namespace) -> Any:
    from .metrics import summarize
    from .sweeps.knockout import DEFAULT_EDGES, knockout_sweep

    with run.stage("knockout") as info:
        edges = parse_edges(args.edges) or list(DEFAULT_EDGES)
        df = knockout_sweep(model, conflict, edges=edges, layers=parse_layers(args.layers, model.cfg.n_layers),
                            window=args.window, window_mode=args.window_mode, batch_size=args.batch_size,
                            first_token=args.first_token, progress=not run.quiet)
        run.csv(df, "knockout.csv")
        s = summarize(df, "delta", ["condition", "edge", "layer"])
        run.csv(s, "knockout_summary.csv")
        worst = {}
        for cond, g in s.groupby("condition"):
            r = g.loc[g["mean"].idxmin()]
            worst[cond] = {"edge": r["edge"], "layer": int(r["layer"]), "mean_delta": round(float(r["mean"]), 4)}
        run.results["knockout"] = {"n_rows": len(df), "edges": [f"{a}↛{b}" for a, b in edges], "largest_drop": worst}
        info["summary"] = f"{len(edges)} edges × {df['layer'].nunique()} layers × {df['sample_id'].nunique()} " \
                          "samples; largest drop: " + "; ".join(
                              f"{c}: {w['edge']} @ layer {w['layer']} ({100 * w['mean_delta']:+.1f}%)"
                              for c, w in worst.items())
    return df


def stage_contributions(run: Run, model: Any, conflict: list, args: argparse.Namespace) -> Any:
    from .lens import contributions

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


def stage_anchors(run: Run, model: Any, conflict: list, args: argparse.Namespace) -> Any:
    from .lens import anchor_readout

    with run.stage("anchors") as info:
        groups = _csv_list(args.groups) or ["instruction", "last"]
        df = anchor_readout(model, usable_for_lens(model, conflict), groups=groups, batch_size=args.batch_size,
                            progress=not run.quiet)
        run.csv(df, "anchors.csv")
        best = {}
        for (cond, g), d in df.groupby(["condition", "group"]):
            r = d.loc[d["agreement"].idxmax()]
            best[f"{cond}/{g}"] = {"layer": int(r["layer"]), "agreement": round(float(r["agreement"]), 4)}
        run.results["anchors"] = {"best_agreement": best}
        info["summary"] = "best agreement " + "; ".join(f"{k} {v['agreement']:.2f} @ layer {v['layer']}"
                                                        for k, v in best.items())
    return df


def stage_heads(run: Run, model: Any, conflict: list, general: list, args: argparse.Namespace) -> Any:
    import pandas as pd

    from .sweeps.head_experiment import heads_experiment
    from .sweeps.heads import head_scores, score_matrix, select_heads

    conflict = usable_for_lens(model, conflict)
    with run.stage("heads") as info:
        cond = None if args.select_condition == "both" else args.select_condition
        res = heads_experiment(model, conflict, general, pct=args.pct, method=args.method, select_condition=cond,
                               mode=args.mode, alphas=_csv_list(args.alphas, float), n_random=args.n_random,
                               select_frac=args.select_frac, seed=args.seed, batch_size=args.batch_size,
                               progress=not run.quiet)
        sel_ids = set(res.split["selection"])
        sel_samples = [s for s in conflict if s.id in sel_ids]
        tables = [res.scores]
        for m in _csv_list(args.heatmap_methods):
            if m not in HEAD_METHODS:
                raise ModalityCircuitsError(f"--heatmap-methods: unknown method {m!r}; choose from {HEAD_METHODS}.")
            if m != args.method:
                tables.append(head_scores(model, sel_samples, method=m, mode=args.mode, batch_size=args.batch_size,
                                          progress=not run.quiet))
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


def stage_attention_views(run: Run, model: Any, samples: list, heads: list, args: argparse.Namespace) -> None:
    """circuitsvis views of ``heads`` (the top heads by score) and attention over the image, one sample per
    condition (from the evaluation split)."""
    from .errors import ModalityCircuitsError as MCE
    from .viz.attention import attention_view_props
    from .viz.image_attention import image_attention_maps

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
    from .report import build_report

    with run.stage("report") as info:
        path = build_report(run.out, png=png)
        info["summary"] = f"wrote {path}"
    return path


# ============================================================================================== commands
def cmd_evaluate(args: argparse.Namespace) -> int:
    run = Run(args, "evaluate")
    with run.stage("load") as info:
        model = load_model(args, run)
        info["summary"] = f"{run.manifest['model']['architecture']} from {run.manifest['model']['path']}"
    if args.data in (None, "synthetic"):
        from .toy.evaluate import EVAL_SEED, evaluate_model

        with run.stage("evaluate") as info:
            seed = EVAL_SEED if args.seed is None else args.seed
            ev = evaluate_model(model, n=args.n or 200, seed=seed, batch_size=args.batch_size,
                                progress=not run.quiet)
            for k, v in ev.items():
                if isinstance(v, dict) and "accuracy" in v:
                    v.setdefault("n", ev["n_per_condition"])
            run.manifest["data"] = {"source": "synthetic (held-out evaluation sets)", "seed": seed,
                                    "n_per_condition": ev["n_per_condition"]}
            run.json(ev, "evaluate.json")
            run.results["evaluate"] = ev
            info["summary"] = accuracy_line(ev)
    else:
        if args.seed is None:
            args.seed = 0
        conflict, general = load_data(args, model, run)
        ev = stage_evaluate(run, model, conflict, general, args)
    run.write_manifest(final=True)
    if not run.quiet:
        print(json.dumps(_jsonable(ev), indent=2))
    return 0


def _analysis(args: argparse.Namespace, command: str) -> tuple[Run, Any, list, list]:
    if args.seed is None:
        args.seed = 0
    seed_everything(args.seed)
    run = Run(args, command)
    with run.stage("load") as info:
        model = load_model(args, run)
        conflict, general = load_data(args, model, run)
        info["summary"] = (f"{run.manifest['model']['architecture']} ({model.cfg.n_layers} layers × "
                           f"{model.cfg.n_heads} heads); {len(conflict)} conflict + {len(general)} general-ability "
                           f"samples from {run.manifest['data']['source']}")
    return run, model, conflict, general


def _finish(run: Run) -> int:
    run.write_manifest(final=True)
    run.say(f"results in {run.out}/ (rebuild the report with: modality-circuits report {run.out})")
    return 0


def cmd_knockout(args: argparse.Namespace) -> int:
    run, model, conflict, _ = _analysis(args, "knockout")
    stage_knockout(run, model, conflict, args)
    return _finish(run)


def cmd_contributions(args: argparse.Namespace) -> int:
    run, model, conflict, _ = _analysis(args, "contributions")
    stage_contributions(run, model, conflict, args)
    return _finish(run)


def cmd_anchors(args: argparse.Namespace) -> int:
    run, model, conflict, _ = _analysis(args, "anchors")
    stage_anchors(run, model, conflict, args)
    return _finish(run)


def cmd_heads(args: argparse.Namespace) -> int:
    run, model, conflict, general = _analysis(args, "heads")
    stage_heads(run, model, conflict, general, args)
    return _finish(run)


def cmd_reproduce(args: argparse.Namespace) -> int:
    run, model, conflict, general = _analysis(args, "reproduce")
    stage_evaluate(run, model, conflict, general, args)
    stage_knockout(run, model, conflict, args)
    stage_contributions(run, model, conflict, args)
    stage_anchors(run, model, conflict, args)
    stage_heads(run, model, conflict, general, args)
    path = stage_report(run, png=not args.no_png)
    run.write_manifest(final=True)
    run.say(f"report: {path}")
    print(f"total time: {time.time() - run.t0:.1f} s", flush=True)
    return 0


def cmd_train_toy(args: argparse.Namespace) -> int:
    from .models import HookedMLLM
    from .toy.evaluate import evaluate_model, write_model_card
    from .toy.model import ToyConfig
    from .toy.train import train_toy

    seed_everything(args.seed)
    if args.steps < 1 or args.minutes <= 0 or args.n_train < 1:
        raise ModalityCircuitsError("--steps and --n-train must be >= 1 and --minutes > 0.")
    out = Path(args.out)
    t0 = time.time()
    cfg = ToyConfig(seed=args.seed, steps=args.steps, max_minutes=args.minutes, n_train=args.n_train)

    def evaluate(path: Path) -> dict:
        return evaluate_model(HookedMLLM.from_pretrained(path), n=args.eval_n, progress=not args.quiet)

    summary = train_toy(out, cfg, progress=not args.quiet, evaluate_fn=evaluate)
    write_model_card(out, summary)
    m = summary.get("metrics", {})
    for v in m.values():
        if isinstance(v, dict) and "accuracy" in v:
            v.setdefault("n", m.get("n_per_condition"))
    if not args.quiet:
        print(f"[train-toy] {summary['steps_done']} steps in {summary['train_minutes']} min, final loss "
              f"{summary['final_loss']:.4f}; {accuracy_line(m)}")
        print(f"model + model card in {out}/ ({time.time() - t0:.0f} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    d = Path(args.results)
    if not d.is_dir():
        raise FileNotFoundError(f"results directory not found: {d}")
    path = build_report(d, out=args.out, png=not args.no_png)
    if not args.quiet:
        print(f"wrote {path}")
    return 0


# ================================================================================================ parser
def _common(p: argparse.ArgumentParser, n_help: str, seed_help: str = "random seed (default: 0)") -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", default=None,
                   help=f"local HF checkpoint directory (default: the shipped toy model, {DEFAULT_MODEL})")
    g.add_argument("--data", metavar="SOURCE", default="synthetic",
                   help="'synthetic' (seeded synthetic conflict data, default) or a Modality-Following/MC² JSON "
                        "file (all its conflict samples; the instructed modality is read from each instruction)")
    g.add_argument("--images", metavar="DIR", default=None, help="COCO 2014 image folder (needed with a JSON --data)")
    g.add_argument("--question", type=int, choices=(1, 2, 3), default=3,
                   help="which questionK variant of the JSON records (format sentence; default: 3)")
    g.add_argument("--n", type=int, default=None, metavar="N", help=n_help)
    g.add_argument("--n-general", type=int, default=None, metavar="N",
                   help="synthetic general-ability control: N consistent, N image-only and N text-only probe "
                        "samples (default: max(4, n/4); 0 to skip)")
    g.add_argument("--seed", type=int, default=None, help=seed_help)
    r = p.add_argument_group("runtime and output")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    r.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default: float32)")
    r.add_argument("--batch-size", type=int, default=16, metavar="B", help="samples per forward batch (default: 16)")
    r.add_argument("--threads", type=int, default=None, metavar="T", help="torch CPU threads (default: torch's)")
    r.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<command>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def _knockout_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("knockout")
    g.add_argument("--edges", default=None, metavar="LIST",
                   help="comma-separated src->dst edges (default: the paper's nine, e.g. image->last)")
    g.add_argument("--layers", default=None, metavar="LIST", help="layers to centre windows at, e.g. 0,2,4 or 3-7 "
                                                                  "(default: all)")
    g.add_argument("--window", type=int, default=1, metavar="K", help="knock out K consecutive layers (default: 1)")
    g.add_argument("--window-mode", choices=("centered", "start"), default="centered",
                   help="window centred on the layer or starting at it (default: centered)")
    g.add_argument("--first-token", action="store_true", help="score only the answers' first token")


def _anchor_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("anchors").add_argument(
        "--groups", default="instruction,last", metavar="LIST",
        help="token groups to read out with the logit lens (default: instruction,last)")


def _head_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("critical heads")
    g.add_argument("--method", choices=HEAD_METHODS, default="ablation", help="head score used for the selection "
                                                                              "(default: ablation)")
    g.add_argument("--heatmap-methods", default="ablation,attribution,dla,attention", metavar="LIST",
                   help="head scores drawn as heatmaps (default: all four)")
    g.add_argument("--pct", type=float, default=5.0, help="select the top PCT%% heads (default: 5)")
    g.add_argument("--mode", choices=("zero", "mean"), default="zero", help="head ablation (default: zero)")
    g.add_argument("--alphas", default="2,4,8", metavar="LIST", help="amplification factors (default: 2,4,8)")
    g.add_argument("--n-random", type=int, default=10, metavar="R", help="random head sets as control (default: 10)")
    g.add_argument("--select-frac", type=float, default=0.5, metavar="F",
                   help="share of conflict samples used to select heads; the rest evaluates (default: 0.5)")
    g.add_argument("--select-condition", choices=("both", "image", "text"), default="both",
                   help="condition whose scores select the heads (default: both pooled)")
    g.add_argument("--top-heads", type=int, default=6, metavar="K", help="heads shown in attention views (default: 6)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``modality-circuits``."""
    parser = argparse.ArgumentParser(
        prog="modality-circuits", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mechanistic interpretability of modality following in multimodal LLMs: which layers, heads and "
                    "token groups decide\nwhether the model follows the image or the text when the instruction says "
                    "which to trust.",
        epilog="examples:\n"
               "  modality-circuits reproduce                      # the shipped toy model + synthetic data\n"
               "  modality-circuits evaluate --model DIR\n"
               "  modality-circuits knockout --data FILE.json --images COCO_DIR --window 9 --device cuda\n"
               "  modality-circuits report runs/reproduce\n"
               "run `modality-circuits COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    n_syn = "synthetic: number of conflict samples, half per condition (default: 200); JSON: first N records " \
            "(default: all)"

    p = sub.add_parser("reproduce", help="the main job: MFR, knockout, contributions, anchors, heads, report",
                       description="MFR -> knockout sweep -> contributions -> anchor read-out -> head scores -> "
                                   "blocking/amplification with controls -> HTML report.")
    _common(p, n_syn)
    _knockout_opts(p)
    _anchor_opts(p)
    _head_opts(p)
    p.add_argument("--no-png", action="store_true", help="skip PNG export of figures (it needs kaleido + Chromium)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("evaluate", help="MFR per condition, probe accuracy and failure counts",
                       description="Synthetic: held-out sets (N per condition) via toy.evaluate.evaluate_model; "
                                   "JSON: MFR per condition of the file's conflict samples.")
    _common(p, "synthetic: samples per condition (default: 200); JSON: first N records (default: all)",
            seed_help="random seed (default: the held-out evaluation seed for synthetic data, 0 otherwise)")
    p.set_defaults(func=cmd_evaluate)

    for name, helptext, opts, func in [
            ("knockout", "attention knockout sweep (layers × edges)", [_knockout_opts], cmd_knockout),
            ("contributions", "attention vs MLP direct contributions per layer", [], cmd_contributions),
            ("anchors", "logit-lens read-out at the instruction tokens and the last position", [_anchor_opts],
             cmd_anchors),
            ("heads", "head scores, top-p percent selection, blocking/amplification with controls, attention views",
             [_head_opts], cmd_heads)]:
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _common(p, n_syn)
        for o in opts:
            o(p)
        p.set_defaults(func=func)

    p = sub.add_parser("train-toy", help="train the toy MLLM from scratch and write its model card",
                       description="Train the toy LLaVA on seeded synthetic data (CPU), evaluate it on held-out "
                                   "samples and write README.md/metrics.json next to the checkpoint.")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000)")
    p.add_argument("--minutes", type=float, default=13.0, help="wall-clock budget in minutes (default: 13)")
    p.add_argument("--n-train", type=int, default=24000, metavar="N", help="training samples (default: 24000)")
    p.add_argument("--eval-n", type=int, default=200, metavar="N",
                   help="held-out evaluation samples per condition (default: 200)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    p.set_defaults(func=cmd_train_toy)

    p = sub.add_parser("report", help="rebuild the HTML report from a results directory",
                       description="Rebuild the self-contained HTML report from a results directory.")
    p.add_argument("results", metavar="RESULTS_DIR", help="directory written by reproduce (or the analyses)")
    p.add_argument("--out", metavar="FILE", default=None, help="HTML file to write (default: RESULTS_DIR/report.html)")
    p.add_argument("--no-png", action="store_true", help="skip PNG export of figures (it needs kaleido + Chromium)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modality-circuits`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("batch_size", "n_random", "top_heads", "window", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1 (got {v})", file=sys.stderr)
            return 2
    det = _deterministic_state()
    try:
        return int(args.func(args) or 0)
    except (ModalityCircuitsError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:  # main() may run inside another program (tests, notebooks): leave torch's global mode as it was
        if det is not None:
            import torch

            torch.use_deterministic_algorithms(det[0], warn_only=det[1])


def _deterministic_state() -> tuple[bool, bool] | None:
    if "torch" not in sys.modules:
        return (False, False)
    import torch

    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


if __name__ == "__main__":
    sys.exit(main())
