"""Forward-pass time of HookedMLLM relative to HF LLaVA on the same batch (fp32, eager attention, CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_forward.py [--runs 15] [--threads 1]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_forward.py --model smollava --runs 7 --threads 2

Two random configs: ``tiny`` (the test model) and ``mid`` (d_model 512, 8 layers, 8 heads, d_mlp 1376, a
2-layer vision tower on 128x128 images with 8x8 patches = 256 image tokens per image). The batch holds two
prompts of different lengths (left padding), one image each. Both models run under ``torch.no_grad()``, warmed
up, then timed alternately (HF, hooked, HF, ...) so background load hits both alike; the table shows medians.
No assertions: this only reports (the target is a ratio <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modality_circuits import HookedMLLM, Segment  # noqa: E402
from modality_circuits.testing import random_images, tiny_bpe_tokenizer, tiny_llava  # noqa: E402

CONFIGS = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, image_size=32, patch_size=8,
                 vision_layers=2, d_vision=32),
    "mid": dict(n_layers=8, d_model=512, n_heads=8, d_mlp=1376, image_size=128, patch_size=8, vision_layers=2,
                d_vision=128),
}


def make_batch(model: HookedMLLM, size: int):
    ims = random_images(2, size=size, seed=0)
    prompts = [
        [Segment("image", image=ims[0]), Segment("context", "Text context: the shape in the image is a red circle."),
         Segment("instruction", "you must rely on the image content rather than the text context."),
         Segment("question", "What is the color of the shape?"),
         Segment("constraint", "Answer the question using a single word or phrase.")],
        [Segment("image", image=ims[1]), Segment("question", "What is the shape?")],
    ]
    return model.prepare(prompts)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, tokenizer, runs: int, warmup: int) -> dict:
    hf = tiny_llava(tokenizer, **CONFIGS[name])
    model = HookedMLLM.from_hf(hf, tokenizer)
    batch = make_batch(model, CONFIGS[name]["image_size"])
    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)

    def run_hf():
        return hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, position_ids=pos,
                  **batch.model_inputs).logits

    def run_hooked():
        return model(batch)

    def run_cache():
        return model.run_with_cache(batch)

    with torch.no_grad():
        m = batch.attention_mask.bool()
        diff = float((run_hf()[m] - run_hooked()[m]).abs().max())
        for _ in range(warmup):
            run_hf(), run_hooked(), run_cache()
        t_hf, t_ours, t_cache = [], [], []
        for _ in range(runs):
            t_hf.append(timed(run_hf))
            t_ours.append(timed(run_hooked))
            t_cache.append(timed(run_cache))
    med = statistics.median
    return dict(config=name, seq=batch.seq_len, img_tok=int(batch.spans.mask("image").sum()), hf=med(t_hf),
                hooked=med(t_ours), cache=med(t_cache), ratio=med(t_ours) / med(t_hf),
                ratio_min=min(t_ours) / min(t_hf), diff=diff)


def bench_checkpoint(spec: str, runs: int, warmup: int, n: int) -> None:
    """HookedMLLM vs HF eager and HF sdpa on a real checkpoint (``smollava`` or a folder), ``n`` synthetic samples."""
    from transformers import AutoModelForImageTextToText

    from modality_circuits.cli.run import resolve_model
    from modality_circuits.data.synthetic import checkpoint_data_spec, synthetic

    path = resolve_model(spec)
    model = HookedMLLM.from_pretrained(path)
    hf = {impl: AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()
          for impl in ("eager", "sdpa")}
    samples = synthetic(n, seed=0, image_size=model.image_encoder.native_image_size or 32,
                        distractors=checkpoint_data_spec(path)["distractors"])
    batch = model.prepare(samples)
    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    m = batch.attention_mask.bool()
    fns = {"hooked": lambda: model(batch)}
    for impl, h in hf.items():
        fns[f"hf_{impl}"] = (lambda h=h: h(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                                           position_ids=pos, **batch.model_inputs).logits)
    with torch.no_grad():
        out = {k: f() for k, f in fns.items()}
        diff = {k: float((out["hooked"][m] - out[k][m]).abs().max()) for k in ("hf_eager", "hf_sdpa")}
        for _ in range(warmup):
            for f in fns.values():
                f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(runs):  # alternate, so background load hits all alike
            for k, f in fns.items():
                times[k].append(timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{spec} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}): batch "
          f"{len(batch)} x {batch.seq_len} tokens, {torch.get_num_threads()} thread(s), median of {runs} runs")
    for k in fns:
        print(f"  {k:<9} {1e3 * med[k]:9.1f} ms")
    print(f"  ratio HookedMLLM / HF eager {med['hooked'] / med['hf_eager']:.3f} (goal <= 1.15); / HF sdpa "
          f"{med['hooked'] / med['hf_sdpa']:.3f}; max |dlogit| vs eager {diff['hf_eager']:.1e}, vs sdpa "
          f"{diff['hf_sdpa']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 is the most stable on a shared CPU)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--model", default=None, help="a real checkpoint instead (smollava or a folder)")
    ap.add_argument("--n", type=int, default=4, help="samples in the batch with --model (default: 4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        bench_checkpoint(args.model, args.runs, args.warmup, args.n)
        return
    tokenizer = tiny_bpe_tokenizer()
    rows = [bench(name, tokenizer, args.runs, args.warmup) for name in args.configs]
    print(f"HookedMLLM vs HF LLaVA forward (fp32, eager, no_grad, batch 2, {args.threads} thread(s), "
          f"median of {args.runs} runs after {args.warmup} warmup)")
    head = (f"{'config':<6} {'seq':>4} {'img_tok':>7} {'HF ms':>9} {'Hooked ms':>10} {'ratio':>6} "
            f"{'ratio(min)':>10} {'cache ms':>9} {'max|dlogit|':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<6} {r['seq']:>4} {r['img_tok']:>7} {1e3 * r['hf']:>9.2f} {1e3 * r['hooked']:>10.2f} "
              f"{r['ratio']:>6.2f} {r['ratio_min']:>10.2f} {1e3 * r['cache']:>9.2f} {r['diff']:>12.2e}")


if __name__ == "__main__":
    main()
