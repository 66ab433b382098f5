"""Peak host memory of loading a checkpoint: HookedMLLM.from_pretrained vs HF's from_pretrained, per weight byte.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_loading.py [--dtype float32] [--dir /tmp/mc-bench-load]

Builds once a random LLaVA whose decoder has the real-LM default's shape (SmolLM2-135M: 30 layers, d_model 576,
9 query / 3 KV heads, d_mlp 1536, tied 49,152 x 576 embeddings; a tiny CLIP tower) and saves it as safetensors.
Then, each in a fresh process, (a) HF ``LlavaForConditionalGeneration.from_pretrained`` with every weight touched
and (b) ``HookedMLLM.from_pretrained``; each reports the rise of its peak resident memory (``VmHWM``) over its
resident memory after the imports. Printed: rise / bytes of the weights on disk for both, in one run.
The bound is 1.3 (issue: loading at most 1.3x the weights). No assertions: this only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOUND = 1.3


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child(which: str, path: str, dtype: str) -> None:
    import torch
    import transformers  # noqa: F401

    from modality_circuits import HookedMLLM

    base = _status("VmRSS")
    if which == "hf":
        m = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype),
                                                                       local_files_only=True)
        total = sum(float(p.detach().sum()) for p in m.parameters())  # touch every weight (no copy)
    else:
        m = HookedMLLM.from_pretrained(path, dtype=dtype)
        total = sum(float(p.detach().sum()) for p in m.parameters())
    print(json.dumps({"rise": _status("VmHWM") - base, "check": total}))


def build(path: Path, dtype: str) -> None:
    import torch

    from modality_circuits.testing import tiny_bpe_tokenizer, tiny_llava

    tok = tiny_bpe_tokenizer()
    hf = tiny_llava(tok, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_pad=49152 - len(tok),
                    text_overrides={"tie_word_embeddings": True, "head_dim": 64,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}})
    hf.to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dir", default="/tmp/mc-bench-load")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.dtype)
    path = Path(a.dir) / a.dtype
    if not (path / "model.safetensors").exists():
        build(path, a.dtype)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = {}
    for which in ("hf", "hooked"):
        r = subprocess.run([sys.executable, __file__, "--dtype", a.dtype, "--child", which, str(path)],
                           capture_output=True, text=True, check=True)
        out[which] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"checkpoint: SmolLM2-135M-shaped LLaVA, {a.dtype}, {weights / 2**20:.0f} MiB of weights on disk")
    print(f"{'loader':<30} {'peak rise MiB':>14} {'/ weights':>10}   bound")
    for which, name in (("hf", "HF from_pretrained"), ("hooked", "HookedMLLM.from_pretrained")):
        rise = out[which]["rise"]
        print(f"{name:<30} {rise / 2**20:>14.0f} {rise / weights:>10.2f}   {BOUND if which == 'hooked' else ''}")


if __name__ == "__main__":
    main()
