"""GPU benchmark of the paper pipeline at the paper's shapes: random-init LLaVA-1.5-7B and Qwen2.5-VL-7B with their
exact configurations (no weights needed), bfloat16, 576 image tokens per image, and the cost of the whole study
extrapolated to the paper's 842 samples.

    python benchmarks/gpu_paper_pipeline.py                        # a CUDA machine; under 10 minutes on one H100/H200
    python benchmarks/gpu_paper_pipeline.py --tiny --device cpu    # the same code on shrunk configs (a CPU check)

Per model, on ``--n`` synthetic conflict samples (one batch; images sized to give 576 image tokens):

* forward: HookedMLLM vs HF with ``sdpa`` and with ``eager`` attention (fastest of ``--repeats``), the largest
  logit difference to HF eager on the real (unpadded) positions, and peak GPU memory;
* knockout sweep: every layer (window 1) × the 9 default edges, seconds per sample and peak memory;
* head scores: the exact zero-ablation scan of every head at every position (``ablation``) and attribution
  patching (``attribution``), seconds per sample;
* scoring: the binary following score (one prompt pass), seconds per sample: blocking and amplification are this
  many passes per head set;
* the study extrapolated to 842 samples: knockout on all samples, head scores on the selection half, blocking with
  the selected set and 10 random sets on the evaluation half and amplification (3 factors × 11 sets) on an
  assumed 10% of failed samples; hours on one GPU, per method of head scoring.

Prints one table and writes ``--out`` (JSON). No assertions: this only reports. Peak memory is
``torch.cuda.max_memory_allocated`` (0 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modality_circuits import HookedMLLM  # noqa: E402
from modality_circuits.data.synthetic import synthetic  # noqa: E402
from modality_circuits.metrics import score_dataset  # noqa: E402
from modality_circuits.sweeps import DEFAULT_EDGES, knockout_sweep  # noqa: E402
from modality_circuits.sweeps.heads import head_scores  # noqa: E402
from modality_circuits.testing import QWEN_SPECIALS, tiny_bpe_tokenizer, tiny_qwen_tokenizer  # noqa: E402

PAPER_SAMPLES = 842

#: The published configurations (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct); ``tiny`` shrinks them.
LLAVA_TEXT = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
LLAVA_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
QWEN_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                 tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
TINY = {"llava": (dict(TINY_TEXT, num_key_value_heads=4), dict(hidden_size=64, intermediate_size=128,
                                                               num_hidden_layers=2, num_attention_heads=4)),
        "qwen2.5-vl": (dict(TINY_TEXT, num_key_value_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
                       dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                            fullatt_block_indexes=[1]))}
#: image side giving 576 image tokens: LLaVA (336/14)^2; Qwen2.5-VL (672/14)^2 / 2^2 (merge)
IMAGE_SIDE = {"llava": 336, "qwen2.5-vl": 672}


def build(name: str, tiny: bool, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """(HF model with random weights, tokenizer); the HF model on ``device`` in ``dtype``, sdpa attention."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    if name == "llava":
        tok = tiny_bpe_tokenizer()
        text, vision = dict(LLAVA_TEXT), dict(LLAVA_VISION)
        if tiny:
            text.update(TINY[name][0])
            vision.update(TINY[name][1])
        text.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                          image_token_id=tok.convert_tokens_to_ids(tok.image_token), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
        cls = LlavaForConditionalGeneration
    else:
        tok = tiny_qwen_tokenizer()
        ids = {t: tok.convert_tokens_to_ids(t) for t in (*QWEN_SPECIALS, "<|image_pad|>")}
        text, vision = dict(QWEN_TEXT), dict(QWEN_VISION)
        if tiny:
            text.update(TINY[name][0])
            vision.update(TINY[name][1])
        text.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                               vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|im_end|>"])
        cls = Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = cls._from_config(cfg, torch_dtype=dtype)
    return hf.eval(), tok


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fastest(fn: Any, repeats: int, device: str) -> tuple[Any, float]:
    out, best = None, float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0


@torch.no_grad()
def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype, dev = getattr(torch, args.dtype), args.device
    t0 = time.perf_counter()
    hf, tok = build(name, args.tiny, dtype, dev)
    model = HookedMLLM.from_hf(hf, tok, dtype=dtype, device=dev)
    t_build = time.perf_counter() - t0
    samples = synthetic(args.n, seed=0, kind="conflict", image_size=IMAGE_SIDE[name])
    batch = model.prepare(samples)
    img_tokens = int(batch.spans.mask("image").sum()) // len(batch)
    mi = batch.model_inputs
    hf_kw: dict[str, Any] = dict(input_ids=batch.tokens, attention_mask=batch.attention_mask)
    if name == "qwen2.5-vl":  # HF takes one patch tensor; it computes M-RoPE positions from mm_token_type_ids
        hf_kw.update(pixel_values=torch.cat(mi["pixel_values"]), image_grid_thw=mi["image_grid_thw"],
                     mm_token_type_ids=(batch.tokens == hf.config.image_token_id).int())
    else:
        hf_kw["pixel_values"] = mi["pixel_values"]
    if name == "llava":  # left padding: HF LLaVA counts positions from 0 at the pad, HookedMLLM from the first token
        hf_kw["position_ids"] = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    real = batch.attention_mask.bool()

    def run_hf() -> torch.Tensor:
        return hf(**hf_kw).logits

    res: dict[str, Any] = {"model": name, "tiny": args.tiny, "dtype": args.dtype, "device": dev,
                           "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads, "d_model": model.cfg.d_model,
                           "batch": len(batch), "seq_len": batch.seq_len, "image_tokens": img_tokens,
                           "build_s": round(t_build, 1)}
    fastest(lambda: model(batch), 1, dev)  # warm-up
    peak_reset(dev)
    ours, res["forward_hooked_s"] = fastest(lambda: model(batch), args.repeats, dev)
    res["forward_peak_gib"] = round(peak_gib(dev), 2)
    hf_sdpa, res["forward_hf_sdpa_s"] = fastest(run_hf, args.repeats, dev)
    hf.config._attn_implementation = "eager"
    for m in hf.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"
    hf_eager, res["forward_hf_eager_s"] = fastest(run_hf, args.repeats, dev)
    res["ratio_vs_sdpa"] = round(res["forward_hooked_s"] / res["forward_hf_sdpa_s"], 3)
    res["ratio_vs_eager"] = round(res["forward_hooked_s"] / res["forward_hf_eager_s"], 3)
    res["max_abs_logit_diff_vs_eager"] = float((ours[real].float() - hf_eager[real].float()).abs().max())
    res["max_abs_logit_diff_sdpa_vs_eager"] = float((hf_sdpa[real].float() - hf_eager[real].float()).abs().max())
    del hf_sdpa, hf_eager, ours

    peak_reset(dev)
    _, t = fastest(lambda: knockout_sweep(model, samples, edges=DEFAULT_EDGES, window=1, batch_size=len(samples),
                                          progress=False), 1, dev)
    res["knockout_s_per_sample"] = t / len(samples)
    res["knockout_configs"] = model.cfg.n_layers * len(DEFAULT_EDGES)
    res["knockout_peak_gib"] = round(peak_gib(dev), 2)
    for method in ("attribution", "ablation"):
        few = samples[:args.n_scan]
        peak_reset(dev)
        _, t = fastest(lambda m=method, few=few: head_scores(model, few, method=m, batch_size=len(few),
                                                             progress=False), 1, dev)
        res[f"heads_{method}_s_per_sample"] = t / len(few)
        res[f"heads_{method}_peak_gib"] = round(peak_gib(dev), 2)
    _, t = fastest(lambda: score_dataset(model, samples, batch_size=len(samples), progress=False), args.repeats, dev)
    res["score_s_per_sample"] = t / len(samples)
    res["extrapolated_hours"] = extrapolate(res)
    return res  # the models are freed with this frame (main() empties the CUDA cache)


def extrapolate(r: dict[str, Any], n: int = PAPER_SAMPLES, sets: int = 11, alphas: int = 3,
                failed: float = 0.10) -> dict[str, float]:
    """Hours of the study on ``n`` samples (one GPU): knockout on all, head scores on half, blocking with ``sets``
    head sets on the other half (+1 unblocked pass), amplification ``alphas × sets`` on ``failed`` of that half."""
    half = n / 2
    knockout = r["knockout_s_per_sample"] * n
    evals = r["score_s_per_sample"] * (half * (1 + sets) + half * failed * alphas * sets)
    out = {}
    for method in ("attribution", "ablation"):
        out[f"study_with_{method}"] = round((knockout + r[f"heads_{method}_s_per_sample"] * half + evals) / 3600, 3)
    out["knockout"] = round(knockout / 3600, 3)
    out["blocking_and_amplification"] = round(evals / 3600, 3)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llava,qwen2.5-vl", help="comma-separated: llava, qwen2.5-vl")
    ap.add_argument("--tiny", action="store_true", help="shrunk configs (same code path; for a CPU check)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--n", type=int, default=8, help="samples in the batch (default: 8)")
    ap.add_argument("--n-scan", type=int, default=2, help="samples for the head scans (default: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards, fastest reported (default: 3)")
    ap.add_argument("--out", default="benchmarks/results/gpu_paper_pipeline.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --tiny --device cpu for a CPU check of the script")
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} thr)"
    results = []
    for name in args.models.split(","):
        t = time.perf_counter()
        r = bench_model(name.strip(), args)
        r["wall_s"] = round(time.perf_counter() - t, 1)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    print(f"\n{where}, {args.dtype}, {time.strftime('%Y-%m-%d')}{' (tiny configs)' if args.tiny else ''}")
    print("| model | seq | img tok | fwd ours / HF sdpa | / HF eager | max dlogit | fwd peak GiB | knockout s/sample "
          "| head scan s/sample (attribution / exact) | study on 842 samples, h (attribution / exact) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        h = r["extrapolated_hours"]
        print(f"| {r['model']} | {r['seq_len']} | {r['image_tokens']} | {r['ratio_vs_sdpa']:.2f} | "
              f"{r['ratio_vs_eager']:.2f} | {r['max_abs_logit_diff_vs_eager']:.2g} | {r['forward_peak_gib']} | "
              f"{r['knockout_s_per_sample']:.2f} | {r['heads_attribution_s_per_sample']:.2f} / "
              f"{r['heads_ablation_s_per_sample']:.2f} | {h['study_with_attribution']:.2f} / "
              f"{h['study_with_ablation']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": where, "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
