"""Knockout sweep: prefix-cached, batched configurations vs one full forward per configuration.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_knockout_sweep.py [--n 32] [--batch-size 16] [--threads 2]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_knockout_sweep.py --model smollava --n 8 --batch-size 8 \
        --window 3 --centers every:3 --repeats 1      # the real-LM default at the budget profile's sweep shape

Model: the shipped toy model (``assets/toy-llava``) if present, else a freshly initialised toy of the same
architecture (:class:`~modality_circuits.toy.model.ToyConfig` defaults, word-level tokenizer). The sweep covers
every layer x ``DEFAULT_EDGES`` on ``n`` synthetic conflict samples, scored with the binary following
probability. Both methods are warmed up on two samples, then timed ``--repeats`` times, alternating (background
load is bursty on shared machines, so the fastest run is the estimate); the printout gives both times, the
speed ratio (target >= 3x), the largest absolute difference of the results (they must agree to ~1e-5), and
the token-layer work ratio (work the cached sweep skips; attention over cached keys and the clean run are not
counted). No assertions: this only reports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modality_circuits import HookedMLLM  # noqa: E402
from modality_circuits.data.synthetic import synthetic  # noqa: E402
from modality_circuits.interventions.core import layer_window  # noqa: E402
from modality_circuits.sweeps import DEFAULT_EDGES, knockout_sweep  # noqa: E402
from modality_circuits.toy.model import load_or_init_toy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from reference import naive_knockout_sweep  # noqa: E402  (one full forward per configuration)


def load_toy(path: Path = ROOT / "assets" / "toy-llava") -> tuple[HookedMLLM, str]:
    return load_or_init_toy(path)


def load_bench_model(spec: str) -> tuple[HookedMLLM, str, list]:
    """(model, description, synthetic conflict samples of its image size and distractors) for ``--model``:
    ``toy`` (default), ``smollava`` (the real-LM default, materialised in the cache) or a checkpoint folder."""
    from modality_circuits.cli.run import resolve_model
    from modality_circuits.data.synthetic import checkpoint_data_spec

    if spec == "toy":
        model, what = load_toy()
        return model, what, []
    path = resolve_model(spec)
    model = HookedMLLM.from_pretrained(path)
    return model, f"{spec} ({path})", [checkpoint_data_spec(path)["distractors"]]


def parse_centers(text: str | None, n_layers: int) -> list[int] | None:
    """``None`` (every layer), ``"every:K"`` (every K-th from 1, as the budget profile) or ``"0,3,6"``."""
    if not text:
        return None
    if text.startswith("every:"):
        return list(range(1, n_layers, int(text.split(":")[1])))
    return [int(x) for x in text.split(",")]


def work_ratio(model: HookedMLLM, samples, batch_size: int, window: int, mode: str,
               centers: list[int] | None = None) -> float:
    """Token-layer count of the naive sweep over that of the cached one (the prefix-caching bound)."""
    n_layers = model.cfg.n_layers
    naive = cached = 0
    for i in range(0, len(samples), batch_size):
        b = model.prepare(samples[i:i + batch_size])
        B, T = b.tokens.shape
        groups: dict[tuple[int, str], int] = {}
        for layer in (range(n_layers) if centers is None else centers):
            lo = min(layer_window(layer, window, n_layers, mode))
            for _, dst in DEFAULT_EDGES:
                groups[(lo, dst)] = groups.get((lo, dst), 0) + 1
                naive += B * T * n_layers
        for (lo, dst), c in groups.items():
            p0 = int(b.spans.first_position(dst).min())
            cached += c * B * max(1, T - p0) * (n_layers - lo)
        cached += B * T * n_layers  # the recorded clean run
    return naive / cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="synthetic conflict samples")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--window-mode", default="centered")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (alternating); min is reported")
    ap.add_argument("--model", default="toy", help="toy (default), smollava (the real-LM default) or a folder")
    ap.add_argument("--centers", default=None, help="window centres: every layer (default), every:K or 0,3,6")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, what, distractors = load_bench_model(args.model)
    size = model.image_encoder.native_image_size or 32
    samples = synthetic(args.n, seed=args.seed, image_size=size, distractors=(distractors or [0])[0])
    centers = parse_centers(args.centers, model.cfg.n_layers)
    b = model.prepare(samples[: args.batch_size])
    n_c = model.cfg.n_layers if centers is None else len(centers)
    n_cfg = n_c * len(DEFAULT_EDGES)
    print(f"model: {what}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab}")
    print(f"sweep: {args.n} samples (batch {args.batch_size}, prompt length ~{b.seq_len}), {n_cfg} configurations "
          f"({n_c} window centres x {len(DEFAULT_EDGES)} edges, window {args.window} {args.window_mode}), "
          f"torch threads {torch.get_num_threads()}")

    kw = dict(window=args.window, window_mode=args.window_mode, batch_size=args.batch_size, centers=centers)
    sweeps = {"cached": lambda s: knockout_sweep(model, s, progress=False, **kw),
              "naive": lambda s: naive_knockout_sweep(model, s, **kw)}
    for method in ("cached", "naive"):  # warm-up
        sweeps[method](samples[:2])
    runs: dict[str, list[float]] = {"cached": [], "naive": []}
    out = {}
    for _ in range(args.repeats):  # alternate, so background load hits both alike; report the fastest run
        for method in ("cached", "naive"):
            t0 = time.perf_counter()
            out[method] = sweeps[method](samples)
            runs[method].append(time.perf_counter() - t0)
    times = {k: min(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}

    key = ["sample_id", "edge", "layer"]
    a = out["cached"].sort_values(key).reset_index(drop=True)
    n = out["naive"].sort_values(key).reset_index(drop=True)
    assert (a[key] == n[key]).all().all()
    d_p = float(np.abs(a["value"] - n["value"]).max())
    d_delta = float(np.abs(a["delta"] - n["delta"]).max())
    print(f"naive  (one full forward per configuration): {times['naive']:8.2f} s  (median {med['naive']:.2f} s)")
    print(f"cached (prefix-cached, batched configs)    : {times['cached']:8.2f} s  (median {med['cached']:.2f} s)")
    print(f"speed ratio naive/cached: {times['naive'] / times['cached']:.2f}x on the fastest of {args.repeats} runs, "
          f"{med['naive'] / med['cached']:.2f}x on medians   (target >= 3x)")
    print(f"token-layer work ratio (bound from skipped prefix work): "
          f"{work_ratio(model, samples, args.batch_size, args.window, args.window_mode, centers):.2f}x")
    print(f"max |p cached - p naive| = {d_p:.2e}   max |delta cached - delta naive| = {d_delta:.2e}   "
          f"({len(a)} rows)")
    print(f"largest |delta| in the sweep: {a['delta'].abs().max():.3f}")


if __name__ == "__main__":
    main()
