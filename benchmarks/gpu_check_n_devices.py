"""GPU check of the several-device split: logits with ``n_devices = all GPUs`` equal one GPU (fp32), and every
block sits where :func:`~modality_circuits.models.devices.placement` says.

    python benchmarks/gpu_check_n_devices.py          # on a machine with >= 2 CUDA devices

Prints the plan and the largest logit difference (bound 1e-4); exits 1 if either check fails. Not run in CI.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modality_circuits import HookedMLLM, Segment  # noqa: E402
from modality_circuits.models.devices import placement  # noqa: E402
from modality_circuits.testing import random_images, tiny_bpe_tokenizer, tiny_llava  # noqa: E402


def main() -> int:
    n = torch.cuda.device_count()
    if n < 2:
        print(f"needs >= 2 CUDA devices, found {n}")
        return 1
    tok = tiny_bpe_tokenizer()
    hf = tiny_llava(tok, n_layers=8, n_kv_heads=2)
    one = HookedMLLM.from_hf(hf, tok, device="cuda:0")
    split = HookedMLLM.from_hf(hf, tok, device="cuda:0", n_devices=n)
    plan = placement(split.cfg)
    wrong = [k for k, d in plan.items() if next(split.get_submodule(k).parameters()).device != d]
    batch = one.prepare([[Segment("image", image=random_images(1)[0]), Segment("question", "What is the shape?")]])
    with torch.no_grad():
        diff = float((one(batch).cpu() - split(batch).cpu()).abs().max())
    print({k: str(v) for k, v in plan.items()})
    print(f"max |logits(1 GPU) - logits({n} GPUs)| = {diff:.2e} (bound 1e-4); misplaced: {wrong}")
    return int(diff > 1e-4 or bool(wrong))


if __name__ == "__main__":
    sys.exit(main())
