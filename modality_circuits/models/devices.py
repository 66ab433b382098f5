"""Several GPUs: the decoder's blocks split over ``cuda:0 … cuda:n-1`` as TransformerLens splits them.

``HookedMLLM.from_pretrained(path, device="cuda", n_devices=4)`` sets ``cfg.n_devices``; TransformerLens then puts
block ``i`` on ``cuda:(i * n_devices // n_layers)`` and moves activations between them in the forward. The
embedding, the image encoder (vision tower + projector) and the image-feature injection sit on the first device
(``cfg.device``), the unembedding on the last. :func:`placement` computes that plan without any GPU, so it can be
checked (and printed) before loading.
"""

from __future__ import annotations

from typing import Any, no_type_check

import torch
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from ..errors import CheckpointError


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
def check_n_devices(device: str | torch.device, n_devices: int) -> None:
    """``n_devices`` is a positive int, and more than one needs CUDA devices that exist."""
    if not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1:
        raise CheckpointError(f"n_devices must be a positive integer; got {n_devices!r}.")
    if n_devices == 1:
        return
    dev = torch.device(device)
    if dev.type != "cuda":
        raise CheckpointError(f"n_devices={n_devices} splits the model over CUDA devices; device={str(device)!r} is "
                              "not CUDA. Use device='cuda' (or n_devices=1).")
    start = dev.index or 0
    if torch.cuda.is_available() and start + n_devices > torch.cuda.device_count():
        raise CheckpointError(f"n_devices={n_devices} from {dev} needs cuda:{start}..cuda:{start + n_devices - 1}; "
                              f"this machine has {torch.cuda.device_count()} CUDA device(s).")


def placement(cfg: Any) -> dict[str, torch.device]:
    """Where each part goes: ``{"embed": …, "image_encoder": …, "blocks.0": …, …, "unembed": …}``."""
    first = torch.device(cfg.device)
    plan = {"embed": first, "image_encoder": first}
    for i in range(cfg.n_layers):
        plan[f"blocks.{i}"] = get_device_for_block_index(i, cfg, first)
    plan["ln_final"] = plan["unembed"] = get_device_for_block_index(cfg.n_layers - 1, cfg, first)
    return plan
