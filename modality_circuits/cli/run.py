"""CLI plumbing: the run directory and manifest, seeding, loading the model and the data, option parsing."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ModalityCircuitsError
from ..resources import toy_model_path

logger = logging.getLogger(__name__)

#: Named models ``--model`` accepts besides a checkpoint directory: the real-LM default (the shipped SmolLLaVA delta,
#: materialised into the cache on first use) and the shipped toy (package resource ``resources/toy-llava``).
MODEL_NAMES = ("smollava", "toy")
DEFAULT_MODEL = "smollava"
DTYPES = ("float32", "bfloat16", "float16")
HEAD_METHODS = ("ablation", "attribution", "dla", "attention")


def resolve_model(spec: str | Path | None) -> Path:
    """The checkpoint directory of ``--model``: a named model (:data:`MODEL_NAMES`; default ``smollava``) or a path.

    ``smollava`` materialises the shipped delta on the cached base (:func:`~modality_circuits.smollava.materialise`;
    a clear error says to run ``modality-circuits fetch-base`` where the base cannot be fetched).
    """
    spec = DEFAULT_MODEL if spec in (None, "") else spec
    if spec == "toy":
        return toy_model_path()
    if spec == "smollava":
        from ..smollava import materialise

        return materialise()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--model: model directory not found: {path} (or use a named model: "
                                f"{', '.join(MODEL_NAMES)})")
    return path


ALL_VARIANTS = "instruction_after_question,swap_instruction_constraint,filler_after_instruction"

#: What the analyses run when an option is left out. ``full`` (models of at most 8 layers, e.g. the toy) is the whole
#: study; ``budget`` (deeper models, e.g. SmolLLaVA's 30 layers) is sized so ``reproduce`` on SmolLLaVA fits 15 minutes
#: on 2 CPU cores: fewer samples, 3-layer knockout windows tiling the 30 layers (centres 1, 4, …, 28; 5-layer windows
#: were tried and miss the instruction's read-out, which needs layers 18-20 cut together), gradient-based head
#: selection (attribution) instead of 270 ablation passes, 4 random head sets, 100 more samples searched for failures,
#: patching on every tenth layer, one random token set, and the prompt-variant reruns on 10 samples (5 per
#: instruction) at every third knockout window (1, 10, 19, 28).
#: An option given on the command line always wins; the profile used is recorded in the manifest and the report.
STUDY_PROFILES: dict[str, dict[str, Any]] = {
    "full": {"n": 200, "centers": None, "window": 1, "method": "ablation",
             "heatmap_methods": "ablation,attribution,dla,attention", "n_random": 10, "n_failed_pool": 1000,
             "n_patch": 16, "patch_every": 1, "random_sets": 2, "variants": ALL_VARIANTS, "variant_n": 0,
             "variant_every": 1},
    "budget": {"n": 40, "centers": "1,4,7,10,13,16,19,22,25,28", "window": 3, "method": "attribution",
               "heatmap_methods": "attribution,dla,attention", "n_random": 4, "n_failed_pool": 100,
               "n_patch": 8, "patch_every": 10, "random_sets": 1, "variants": ALL_VARIANTS, "variant_n": 10,
               "variant_every": 3},
}
FULL_STUDY_MAX_LAYERS = 8


def apply_study_profile(args: argparse.Namespace, n_layers: int) -> str:
    """Fill every study option left at ``None`` from :data:`STUDY_PROFILES` (``full`` for models of at most
    :data:`FULL_STUDY_MAX_LAYERS` layers, else ``budget``); returns the profile's name."""
    name = "full" if n_layers <= FULL_STUDY_MAX_LAYERS else "budget"
    for k, v in STUDY_PROFILES[name].items():
        if hasattr(args, k) and getattr(args, k) is None and not (k == "n" and args.data not in (None, "synthetic")):
            setattr(args, k, v)
    return name


# ============================================================================================ run context
class Run:
    """One command's run directory (:mod:`modality_circuits.rundir`: one configuration per directory, atomic files,
    ``--overwrite`` / ``--resume``), stage status and timings, one-line stage summaries, and the manifest.

    ``planned``: the stages the command runs, in order (the report names the missing ones of an unfinished run).
    """

    def __init__(self, args: argparse.Namespace, command: str, planned: Sequence[str] = ()):
        from ..rundir import claim_run_dir, new_run_dir, point_latest, run_config

        self.args, self.command = args, command
        self.quiet = bool(getattr(args, "quiet", False))
        arguments = _jsonable({k: v for k, v in vars(args).items() if k != "func"})
        config = run_config(command, arguments)
        resume, overwrite = bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False))
        resume = resume or bool(getattr(args, "shard", None))  # shards of one run share its directory
        latest = Path("runs") / command / "latest"
        if args.out:
            self.out = Path(args.out)
        elif resume and latest.is_dir():
            self.out = latest.resolve()
        else:
            self.out = new_run_dir("runs", command)
        previous = claim_run_dir(self.out, config, overwrite=overwrite, resume=resume)
        if not args.out and self.out.parent.name == command:
            point_latest(self.out)
        self.timings: dict[str, float] = {}
        self.stages: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.kept: set[str] = set()
        if previous is not None:  # --resume: keep what the earlier run finished
            self.kept = {k for k, v in previous.get("stages", {}).items() if v.get("status") == "done"} - {"load"}
            self.stages.update({k: previous["stages"][k] for k in self.kept})
            self.timings.update({k: v for k, v in previous.get("timings", {}).items() if k in self.kept})
            self.results.update(previous.get("results", {}))
        self.t0 = time.time()
        self.manifest: dict[str, Any] = {"command": command, "argv": sys.argv[1:], "args": arguments,
                                         "config": config, "seed": getattr(args, "seed", None), "started": _now(),
                                         "versions": versions(), "planned": list(planned), "stages": self.stages,
                                         "timings": self.timings}
        if previous is not None:
            self.manifest["resumed_from"] = {"started": previous.get("started"), "kept": sorted(self.kept)}

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def skip(self, name: str) -> bool:
        """True (and says so) when ``--resume`` keeps stage ``name`` from the earlier run; its files are there."""
        if name in self.kept:
            self.say(f"[{name}] kept from the earlier run (--resume)")
            return True
        return False

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time a stage and record its status (``running`` -> ``done`` / ``failed`` / ``interrupted``) in the
        manifest; the body may set ``info["summary"]`` (printed as one line)."""
        info: dict[str, Any] = {}
        t = time.time()
        self.stages[name] = {"status": "running", "started": _now()}
        self.kept.discard(name)
        self.write_manifest()
        try:
            yield info
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.stages[name] = {"status": status, "seconds": round(time.time() - t, 2),
                                 "error": f"{type(e).__name__}: {e}"[:500]}
            try:
                self.write_manifest()
            except OSError:
                pass  # the original error is the one to report
            raise
        dt = time.time() - t
        self.timings[name] = round(dt, 2)
        self.stages[name] = {"status": info.get("status", "done"), "seconds": round(dt, 2)}
        self.say(f"[{name}] {info.get('summary', 'done')} ({dt:.1f} s)")
        self.write_manifest()

    def csv(self, df: Any, name: str) -> None:
        from ..rundir import atomic_write_text

        atomic_write_text(self.out / name, df.to_csv(index=False))

    def json(self, obj: Any, name: str) -> None:
        from ..rundir import atomic_write_text

        atomic_write_text(self.out / name, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False))

    def write_manifest(self, final: bool = False) -> None:
        self.manifest["results"] = self.results
        if final:
            self.manifest["finished"] = _now()
            self.manifest["total_seconds"] = round(time.time() - self.t0, 2)
        self.json(self.results, "results.json")
        self.json(self.manifest, "manifest.json")


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

    from ..models import HookedMLLM

    path = resolve_model(args.model)
    from ..models.loading import resolve_device

    try:
        resolve_device(args.device)
    except ModalityCircuitsError as e:
        raise ModalityCircuitsError(f"--device {args.device}: {e}") from None
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = HookedMLLM.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device)
    if getattr(args, "distractors", None) is None and hasattr(args, "distractors"):
        from ..data.synthetic import checkpoint_data_spec

        args.distractors = checkpoint_data_spec(path)["distractors"]  # synthetic data as the checkpoint was trained
    if run is not None:
        cfg = json.loads((path / "config.json").read_text())
        run.manifest["model"] = {
            "path": str(path.resolve()), "architecture": (cfg.get("architectures") or ["?"])[0],
            "sha256": sha256_weights(path), "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
            "d_model": model.cfg.d_model, "dtype": args.dtype, "device": args.device,
            "image_tokens": model.image_encoder.fixed_tokens_per_image}
        run.manifest["torch_threads"] = torch.get_num_threads()
    return model


_EXECUTORS: dict[int, Any] = {}


def executor_for(args: argparse.Namespace) -> Any:
    """The work-unit executor of ``--executor`` (None: local, in this process with the loaded model); one per
    command invocation, so Ray's actors and their model replicas serve all of its sweeps."""
    name = getattr(args, "executor", None) or "local"
    if name == "local":
        return None
    if id(args) not in _EXECUTORS:
        _EXECUTORS.clear()
        _EXECUTORS[id(args)] = (args, _build_executor(args, name))  # args kept alive: its id is not reused
    return _EXECUTORS[id(args)][1]


def close_executors() -> None:
    """Stop the command's executor (Ray actors, and a local Ray instance it started); main() calls it at the end."""
    for _, ex in _EXECUTORS.values():
        close = getattr(ex, "close", None)
        if close is not None:
            close()
    _EXECUTORS.clear()


def _build_executor(args: argparse.Namespace, name: str) -> Any:
    from ..sweeps.executors import ModelSpec, RayExecutor, SlurmExecutor

    cuda = str(args.device).startswith("cuda")
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1 if cuda else 0)
    spec = ModelSpec(str(resolve_model(args.model)), dtype=args.dtype, device="cuda" if cuda else str(args.device),
                     threads=args.threads)
    if name == "ray":
        return RayExecutor(spec, workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus,
                           keep_alive=True)  # the replicas serve every sweep of the run (Ray stops at exit)
    params: dict[str, Any] = {"timeout_min": args.slurm_time, "cpus_per_task": max(1, int(args.cpus_per_worker))}
    if gpus:
        params["gpus_per_node"] = int(gpus)
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    return SlurmExecutor(spec, workers=args.workers or 4, parameters=params, cluster=args.slurm_cluster,
                         poll_s=1.0 if args.slurm_cluster == "local" else 10.0)


def load_data(args: argparse.Namespace, model: Any, run: Run | None = None) -> tuple[list, list]:
    """(conflict samples, general-ability samples) from ``--data`` (synthetic by default)."""
    from ..data import load_mc2, synthetic

    if args.data in (None, "synthetic"):
        n = args.n if args.n is not None else 200
        if n < 4:
            raise ModalityCircuitsError(f"--n must be at least 4 (got {n}): both conditions and two splits need "
                                        "samples.")
        size = model.image_encoder.native_image_size or 32
        k_d = getattr(args, "distractors", None) or 0
        conflict = synthetic(n, seed=args.seed, kind="conflict", image_size=size, distractors=k_d)
        ng = args.n_general if args.n_general is not None else max(4, n // 4)
        general = [s for k, kind in enumerate(("consistent", "image_probe", "text_probe"))
                   for s in synthetic(ng, seed=args.seed + 1 + k, kind=kind, image_size=size, distractors=k_d)
                   ] if ng > 0 else []
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
            "general_kinds": sorted({s.kind for s in general}),
            "distractors": (getattr(args, "distractors", None) or 0) if source == "synthetic" else None}
    return conflict, general


def usable_for_lens(model: Any, samples: Sequence[Any]) -> list:
    """Samples whose two answers differ in their first token (needed by the first-token analyses)."""
    from ..metrics import tokenize_answer

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


def parse_variants(text: str | None) -> list[str]:
    """``--variants``: prompt layouts to rerun the instruction/constraint knockouts on (``none``: no rerun)."""
    from ..data.variants import VARIANTS

    names = [v for v in _csv_list(text or "") if v not in ("none", "original")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ModalityCircuitsError(f"--variants: unknown variant(s) {unknown}; choose from "
                                    f"{sorted(set(VARIANTS) - {'original'})} or 'none'.")
    return names


def with_random_controls(edges: Sequence[tuple[str, str]], k: int, like: str = "instruction"
                         ) -> list[tuple[str, str]]:
    """``edges`` plus, for every edge into or out of ``like``, the same edge with each of ``k`` random stand-ins
    (``random0~instruction`` …)."""
    from ..spans import random_group_name

    if k < 0:
        raise ModalityCircuitsError(f"--random-sets must be >= 0, got {k}.")
    out = list(edges)
    for j in range(k):
        name = random_group_name(like, j)
        out += [(name if a == like else a, name if b == like else b) for a, b in edges if like in (a, b)]
    return out


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
            raise ModalityCircuitsError(f"--centers: cannot parse {part!r}; use e.g. 0,2,5 or 3-7.") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise ModalityCircuitsError(f"--centers: {bad} out of range; the model has {n_layers} layers "
                                    f"(0..{n_layers - 1}).")
    return out


