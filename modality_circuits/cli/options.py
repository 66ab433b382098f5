"""The command line's shared option groups (model and data, runtime and output, knockout, anchors, heads)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .run import DTYPES, HEAD_METHODS

if TYPE_CHECKING:
    from ..smollava.train import SmolTrainConfig


def _common(p: argparse.ArgumentParser, n_help: str, seed_help: str = "random seed (default: 0)") -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR|NAME", default=None,
                   help="a local HF checkpoint directory, or 'smollava' (default: SmolLLaVA, the pretrained "
                        "SmolLM2-135M-Instruct with the shipped trained delta, materialised in the cache on first "
                        "use) or 'toy' (the shipped 6-layer toy, for quick runs)")
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
    g.add_argument("--distractors", type=int, default=None, metavar="K", choices=range(4),
                   help="synthetic data: K extra context sentences about other attributes, 0-3 (default: what the "
                        "checkpoint was trained on, from its synthetic_data.json; 0 without one)")
    r = p.add_argument_group("runtime and output")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    r.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default: float32)")
    r.add_argument("--batch-size", type=int, default=16, metavar="B", help="samples per forward batch (default: 16)")
    r.add_argument("--threads", type=int, default=None, metavar="T", help="torch CPU threads (default: torch's)")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="run directory, one configuration per directory (default: a new runs/<command>/<timestamp>, "
                        "with runs/<command>/latest pointing at it)")
    r.add_argument("--resume", action="store_true",
                   help="continue the unfinished run of this configuration in --out (default: runs/<command>/latest), "
                        "keeping its finished stages")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out, whatever its configuration (default: refuse a non-empty --out)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def _knockout_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("knockout")
    g.add_argument("--edges", default=None, metavar="LIST",
                   help="comma-separated src->dst edges (default: the paper's nine, e.g. image->last)")
    g.add_argument("--centers", "--layers", dest="centers", default=None, metavar="LIST",
                   help="window centres (or starts), e.g. 0,2,4 or 3-7 (default: every layer; every third layer "
                        "from 1 on models deeper than 8 layers)")
    g.add_argument("--window", type=int, default=None, metavar="K",
                   help="knock out K consecutive layers (default: 1; 3 on models deeper than 8 layers)")
    g.add_argument("--window-mode", choices=("centered", "start"), default="centered",
                   help="window centred on the layer or starting at it (default: centered)")
    g.add_argument("--random-sets", type=int, default=None, metavar="K",
                   help="control: each edge into or out of the instruction is also run with K random token sets of "
                        "the instruction's size drawn from the other prompt text: system prompt, context, question, "
                        "format sentence (groups random0~instruction …; default: 2 on models of at most 8 layers, 1 "
                        "on deeper ones, to fit the time budget)")
    g.add_argument("--variants", default=None, metavar="LIST",
                   help="position control: rerun the edges into/out of the instruction and the constraint on these "
                        "prompt layouts (instruction_after_question, swap_instruction_constraint, "
                        "filler_after_instruction; 'none' for no rerun; default: all three)")
    g.add_argument("--variant-n", type=int, default=None, metavar="N",
                   help="samples for the --variants reruns, half per instruction (0: all; default: all on models of "
                        "at most 8 layers, 10 on deeper ones, to fit the time budget)")
    g.add_argument("--variant-every", type=int, default=None, metavar="K",
                   help="rerun the variants at every K-th knockout window centre (default: 1 on models of at most 8 "
                        "layers, 3 on deeper ones)")
    g.add_argument("--first-token", action="store_true", help="score only the answers' first token")
    g.add_argument("--metric", default="p_binary", choices=("p_binary", "p_follow", "logit_diff"),
                   help="what the knockout changes: the binary-constrained following probability (default), the "
                        "unconstrained P(following answer), or the log-probability difference")


def _scale_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (the sweeps' work units; results do not depend on these)")
    g.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                   help="where the work units of the knockout sweep and the head experiment run: this process "
                        "(default), Ray actors each holding a model replica (pip install '.[ray]'; joins RAY_ADDRESS "
                        "if set, else starts a local instance), or a Slurm job array via submitit "
                        "(pip install '.[slurm]'; needs a disk shared with the jobs)")
    g.add_argument("--workers", type=int, default=None, metavar="W",
                   help="Ray actors or Slurm array jobs (default: ray: one per GPU with --device cuda, else one per "
                        "CPU; slurm: 4)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per Ray actor or Slurm job (default: 1 with --device cuda, else 0)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="CPU slots per Ray actor or Slurm job (default: 1)")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition of the job array")
    g.add_argument("--slurm-time", type=int, default=60, metavar="MIN",
                   help="time limit of each Slurm job in minutes (default: 60); a job that reaches it is requeued "
                        "and continues with the units not yet on disk")
    g.add_argument("--slurm-cluster", choices=("slurm", "local"), default="slurm",
                   help="'local' runs the job array as local processes through submitit (no Slurm needed; for "
                        "trying a set-up out)")


def _anchor_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("anchors").add_argument(
        "--groups", default="instruction,last", metavar="LIST",
        help="token groups to read out with the logit lens (default: instruction,last)")


def _head_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("critical heads")
    g.add_argument("--method", choices=HEAD_METHODS, default=None,
                   help="head score used for the selection (default: ablation; attribution on models deeper than 8 "
                        "layers)")
    g.add_argument("--heatmap-methods", default=None, metavar="LIST",
                   help="head scores drawn as heatmaps (default: all four; all but ablation on models deeper than 8 "
                        "layers)")
    g.add_argument("--pct", type=float, default=5.0, help="select the top PCT%% heads (default: 5)")
    g.add_argument("--mode", choices=("zero", "mean"), default="zero", help="head ablation (default: zero)")
    g.add_argument("--alphas", default="2,4,8", metavar="LIST", help="amplification factors (default: 2,4,8)")
    g.add_argument("--n-random", type=int, default=None, metavar="R",
                   help="random head sets as control (default: 10; 4 on models deeper than 8 layers)")
    g.add_argument("--select-frac", type=float, default=0.5, metavar="F",
                   help="share of conflict samples used to select heads; the rest evaluates (default: 0.5)")
    g.add_argument("--select-condition", choices=("both", "image", "text"), default="both",
                   help="condition whose scores select the heads (default: both pooled)")
    g.add_argument("--n-failed-pool", type=int, default=None, metavar="N",
                   help="synthetic data: N more seeded conflict samples searched for failures to amplify, beyond "
                        "the evaluation split's (default: 1000; 100 on models deeper than 8 layers; 0: the "
                        "evaluation split only)")
    g.add_argument("--top-heads", type=int, default=6, metavar="K", help="heads shown in attention views (default: 6)")


def parse_task_weights(text: str) -> dict[str, float] | None:
    """``'count=3,position=2'`` -> ``{'count': 3.0, 'position': 2.0}`` (tasks not named get weight 0);
    ``'uniform'`` -> None (every task alike). The inverse of
    :func:`~modality_circuits.smollava.train.format_task_weights`."""
    if text.strip() == "uniform":
        return None
    from ..data.synthetic import TASKS, task_probabilities
    from ..errors import ModalityCircuitsError

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ModalityCircuitsError(f"--task-weights: {part!r} is not TASK=WEIGHT (tasks: {', '.join(TASKS)}; "
                                        "or 'uniform').") from None
    try:
        task_probabilities(out)
    except ValueError as e:
        raise ModalityCircuitsError(f"--task-weights: {e}") from None
    return out


def smol_train_config(args: argparse.Namespace) -> SmolTrainConfig:
    """The :class:`~modality_circuits.smollava.train.SmolTrainConfig` of parsed ``train-smollava`` options."""
    from ..smollava.train import SmolTrainConfig

    extra = {} if args.task_weights is None else {"task_weights": parse_task_weights(args.task_weights)}
    return SmolTrainConfig(seed=args.seed, steps=args.steps, max_minutes=args.minutes, n_train=args.n_train,
                           distractors=args.distractors, vision_pool=args.vision_pool, align_steps=args.align_steps,
                           align_lr=args.align_lr, **extra)
