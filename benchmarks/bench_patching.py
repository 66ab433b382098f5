"""Batched activation patching vs TransformerLens's per-index loop, on the same model and prompts (CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_patching.py [--rows 4] [--max-rows 32] [--threads 1]
                                                                  [--repeats 3] [--config toy|mid] [--heads]

Model: the toy checkpoint ``assets/toy-llava`` if present, else a freshly initialised toy of the same
architecture (``toy_llava(word_level_tokenizer(), ToyConfig())``: 6 layers, d_model 128, 8 heads). Prompts:
text-only context/instruction/question prompts of equal length without padding (clean: the context says colour
``a``; corrupted: colour ``b``), so TransformerLens's helpers on token ids see exactly what we see. Both compute
``[layer, pos]`` resid_pre patching (and, with ``--heads``, ``[layer, pos, head]`` head-output patching) with the
same logit difference: TL with a metric function on logits; we once with our named ``"logit_diff"`` metric (the
default way; the final block then runs attention/MLP only at the last position) and once with TL's metric
function (full-length logits). Each method runs ``--repeats`` times, alternately (after a warm-up forward); the
script prints median times, the ratio TL time / our time (target >= 3x) and checks that the numbers agree to
1e-5 (exit code 1 if not).
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
from modality_circuits.patching import PatchPair, activation_patch  # noqa: E402

COLOURS = [("red", "blue"), ("green", "yellow"), ("purple", "white"), ("blue", "red"), ("yellow", "green"),
           ("white", "purple"), ("red", "green"), ("blue", "yellow")]


def load_model(config: str = "toy") -> HookedMLLM:
    """``toy``: the toy checkpoint (or a fresh toy); ``mid``: a fresh toy-architecture model with d_model 512,
    8 layers, 8 heads, d_mlp 1376 (closer to where matrix products dominate, as in real MLLMs)."""
    from modality_circuits.toy.model import TOY_TEMPLATE, ToyConfig, toy_llava, word_level_tokenizer

    ckpt = Path(__file__).resolve().parents[1] / "assets" / "toy-llava"
    if config == "toy" and (ckpt / "config.json").exists():
        return HookedMLLM.from_pretrained(ckpt)
    cfg = ToyConfig() if config == "toy" else ToyConfig(d_model=512, n_layers=8, n_heads=8, d_mlp=1376)
    tok = word_level_tokenizer()
    return HookedMLLM.from_hf(toy_llava(tok, cfg).eval(), tok, template=TOY_TEMPLATE, source=f"fresh {config}")


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
    ap.add_argument("--config", choices=("toy", "mid"), default="toy", help="model size (see load_model)")
    ap.add_argument("--heads", action="store_true", help="also time [layer, pos, head] head-output patching")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.config)
    pairs = COLOURS[:args.rows]
    clean = model.prepare([prompt(a) for a, _ in pairs])
    corrupted = model.prepare([prompt(b) for _, b in pairs])
    assert bool(clean.attention_mask.all()), "prompts must be unpadded for TL's token-id helpers"
    pair = PatchPair.from_batches(clean, corrupted, answers=pairs)
    ids = model.tokenizer.convert_tokens_to_ids
    a = torch.tensor([ids(x) for x, _ in pairs])
    b = torch.tensor([ids(y) for _, y in pairs])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last.gather(1, a[:, None]) - last.gather(1, b[:, None])).mean()

    print(f"model: {model.source} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.n_heads} heads); pair: {len(pair)} x {pair.seq_len} tokens; threads {args.threads}")
    cases = [("resid_pre [layer, pos]", "resid_pre", "pos", tlp.get_act_patch_resid_pre)]
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
                                               max_rows=args.max_rows).values
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
                ok &= diff < 1e-5
    print("numbers agree" if ok else "NUMBERS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
