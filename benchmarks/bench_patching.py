"""Batched activation patching vs TransformerLens's per-index loop, on the same model and prompts (CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_patching.py [--rows 4] [--max-rows 32] [--threads 1]
                                                                  [--repeats 3] [--config toy|mid|smollava] [--heads]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_patching.py --config smollava --rows 2 --repeats 1 --threads 2 \
        --layers 0,15,29

Model: the toy checkpoint ``assets/toy-llava`` if present, else a freshly initialised toy of the same
architecture (``toy_llava(word_level_tokenizer(), ToyConfig())``: 6 layers, d_model 128, 8 heads); ``smollava``:
the real-LM default (30 layers, d_model 576, 9/3 heads, vocabulary 49,153, in its ChatML layout). Prompts:
text-only context/instruction/question prompts of equal length without padding (clean: the context says colour
``a``; corrupted: colour ``b``), so TransformerLens's helpers on token ids see exactly what we see. Both compute
``[layer, pos]`` resid_pre patching (and, with ``--heads``, ``[layer, pos, head]`` head-output patching) with the
same logit difference: TL with a metric function on logits; we once with our named ``"logit_diff"`` metric (the
default way; the final block then runs attention/MLP only at the last position) and once with TL's metric
function (full-length logits). Each method runs ``--repeats`` times, alternately (after a warm-up forward); the
script prints median times, the ratio TL time / our time (target >= 3x; >= 5x on the real-LM shape), the
peak resident memory of the process (``VmHWM``) and checks that the numbers agree to 1e-5 times the largest
absolute value (at least 1; float32 differences of summation order grow with the values; exit code 1 if not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformer_lens import patching as tlp  # noqa: E402

from modality_circuits import HookedMLLM, Segment  # noqa: E402
from modality_circuits.data.sample import INSTRUCTIONS  # noqa: E402
from modality_circuits.metrics import tokenize_answer  # noqa: E402
from modality_circuits.patching import PatchPair, activation_patch  # noqa: E402

COLOURS = [("red", "blue"), ("green", "yellow"), ("purple", "white"), ("blue", "red"), ("yellow", "green"),
           ("white", "purple"), ("red", "green"), ("blue", "yellow")]


def load_model(config: str = "toy") -> HookedMLLM:
    """``toy``: the toy checkpoint (or a fresh toy); ``mid``: a fresh toy-architecture model with d_model 512,
    8 layers, 8 heads, d_mlp 1376 (closer to where matrix products dominate, as in real MLLMs); ``smollava``: the
    real-LM default, materialised in the cache."""
    if config == "smollava":
        from modality_circuits.cli.run import resolve_model

        return HookedMLLM.from_pretrained(resolve_model("smollava"))
    from modality_circuits.toy.model import TOY_TEMPLATE, ToyConfig, toy_llava, word_level_tokenizer

    ckpt = Path(__file__).resolve().parents[1] / "assets" / "toy-llava"
    if config == "toy" and (ckpt / "config.json").exists():
        return HookedMLLM.from_pretrained(ckpt)
    cfg = ToyConfig() if config == "toy" else ToyConfig(d_model=512, n_layers=8, n_heads=8, d_mlp=1376)
    tok = word_level_tokenizer()
    return HookedMLLM.from_hf(toy_llava(tok, cfg).eval(), tok, template=TOY_TEMPLATE, source=f"fresh {config}")


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux ``VmHWM``), MiB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def prompt(colour: str) -> list[Segment]:
    return [Segment("context", f"Text context: The shape in the image is {colour} ."),
            Segment("instruction", INSTRUCTIONS["text"]), Segment("question", "What is the color of the shape ?"),
            Segment("constraint", "The answer is")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4, help="prompts per side of the pair")
    ap.add_argument("--max-rows", type=int, default=32, help="rows per batched forward (library default 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each method (medians reported)")
    ap.add_argument("--config", choices=("toy", "mid", "smollava"), default="toy", help="model (see load_model)")
    ap.add_argument("--heads", action="store_true", help="also time [layer, pos, head] head-output patching")
    ap.add_argument("--layers", default=None, metavar="LIST",
                    help="resid_pre patching at these layers only (e.g. 0,15,29; TL through generic_activation_patch "
                         "with an index_df of the same (layer, pos) targets), to fit deep models in minutes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.config)
    pairs = COLOURS[:args.rows]
    clean = model.prepare([prompt(a) for a, _ in pairs])
    corrupted = model.prepare([prompt(b) for _, b in pairs])
    assert bool(clean.attention_mask.all()), "prompts must be unpadded for TL's token-id helpers"
    pair = PatchPair.from_batches(clean, corrupted, answers=pairs)
    first = [[tokenize_answer(model.tokenizer, w) for w in p] for p in pairs]  # as the library scores answers
    assert all(len(t) == 1 for p in first for t in p), "the colour words must be single tokens"
    a = torch.tensor([p[0][0] for p in first])
    b = torch.tensor([p[1][0] for p in first])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last.gather(1, a[:, None]) - last.gather(1, b[:, None])).mean()

    print(f"model: {model.source} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.n_heads} heads); pair: {len(pair)} x {pair.seq_len} tokens; threads {args.threads}")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    tl_resid = tlp.get_act_patch_resid_pre
    if layers is not None:
        import pandas as pd

        index = pd.DataFrame([(la, p) for la in layers for p in range(pair.seq_len)], columns=["layer", "pos"])

        def tl_resid(model, tokens, cache, met):  # the same per-index loop, on the chosen layers only
            out = tlp.generic_activation_patch(model, tokens, cache, met, tlp.layer_pos_patch_setter, "resid_pre",
                                               index_df=index)
            return out.view(len(layers), -1)
    cases = [(f"resid_pre [layer, pos]{'' if layers is None else f' at layers {layers}'}", "resid_pre", "pos",
              tl_resid)]
    if args.heads:
        cases.append(("z [layer, pos, head]", "z", "pos", tlp.get_act_patch_attn_head_out_by_pos))
    ok = True
    with torch.no_grad():
        model(clean)  # warm-up
        for label, comp, by, tl_fn in cases:
            methods = {"TL loop": None, "logit_diff": "logit_diff", "callable": metric}
            times: dict[str, list[float]] = {m: [] for m in methods}
            results: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):  # alternate the methods so background load hits all alike
                for name, met in methods.items():
                    t0 = time.perf_counter()
                    if met is None:
                        _, clean_cache = model.run_with_cache(clean.tokens)
                        out = tl_fn(model, corrupted.tokens, clean_cache, metric).cpu()
                    else:
                        out = activation_patch(model, pair, comp, by=by, metric=met, normalize=False,
                                               max_rows=args.max_rows,
                                               layers=layers if comp == "resid_pre" else None).values
                    times[name].append(time.perf_counter() - t0)
                    results[name] = out
            t_tl = statistics.median(times["TL loop"])
            print(f"{label}: {results['TL loop'].numel()} patches; TL per-index loop {t_tl:.2f} s (median of "
                  f"{args.repeats})")
            for name in ("logit_diff", "callable"):
                t = statistics.median(times[name])
                diff = float((results[name] - results["TL loop"]).abs().max())
                print(f"  batched, metric {name:10s} {t:6.2f} s | ratio TL/ours {t_tl / t:4.1f}x | "
                      f"max |diff| {diff:.1e}")
                scale = max(1.0, float(results["TL loop"].abs().max()))  # float32 error grows with the values
                ok &= diff < 1e-5 * scale
    print(f"peak resident memory of the process (VmHWM): {peak_rss_mib():.0f} MiB")
    print("numbers agree" if ok else "NUMBERS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
