"""Slow reference paths the fast engine is compared against: one full forward per configuration, every row
from the embeddings, through the public context managers (no prefix reuse, no batching of configurations)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from modality_circuits.interventions import Knockout, ScaleHeads, apply, layer_window
from modality_circuits.interventions.core import check_layers
from modality_circuits.lens import _answer_dirs
from modality_circuits.metrics import following_scores, iter_batches, relative_change
from modality_circuits.sweeps.knockout import DEFAULT_EDGES, edge_name


@torch.no_grad()
def naive_knockout_sweep(model: Any, samples: Sequence[Any], edges: Sequence[tuple[str, str]] = DEFAULT_EDGES,
                         centers: Sequence[int] | None = None, window: int = 1, window_mode: str = "centered",
                         batch_size: int = 16, first_token: bool = False) -> pd.DataFrame:
    """The knockout sweep's table, one full forward per (window, edge)."""
    centers = check_layers(model, list(range(model.cfg.n_layers)) if centers is None else centers)
    rows = []
    for _, batch in iter_batches(model, samples, batch_size, progress=False):
        base = following_scores(model, batch, first_token).p_binary
        for c in centers:
            win = layer_window(c, window, model.cfg.n_layers, window_mode)
            for src, dst in edges:
                with apply(model, batch, Knockout(src, dst, win, allow_empty=True)):
                    p = following_scores(model, batch, first_token).p_binary
                delta = relative_change(base, p)
                for i, s in enumerate(batch.samples):
                    rows.append({"sample_id": s.id, "edge": edge_name(src, dst), "layer": c,
                                 "base": float(base[i]), "value": float(p[i]), "delta": float(delta[i])})
    return pd.DataFrame(rows)


@torch.no_grad()
def naive_ablation_scan(model: Any, batch: Any, positions: Any = None, first_token: bool = False,
                        baseline: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"delta", "d_logit"}`` ``[layer, n_heads, batch]``: each head ablated in its own full forward."""
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(batch)
    f, c = _answer_dirs(model, batch.samples)

    def ld() -> torch.Tensor:
        last = model(batch)[:, -1]
        return last.gather(1, f[:, None])[:, 0] - last.gather(1, c[:, None])[:, 0]

    base_p, base_ld = following_scores(model, batch, first_token).p_binary, ld()
    delta, dlog = torch.zeros(L, H, B), torch.zeros(L, H, B)
    for layer in range(L):
        for h in range(H):
            with apply(model, batch, ScaleHeads([(layer, h)], 0.0, positions, baseline)):
                p = following_scores(model, batch, first_token).p_binary
                dl = ld()
            delta[layer, h] = relative_change(base_p, p).cpu()
            dlog[layer, h] = (dl - base_ld).cpu()
    return {"delta": delta, "d_logit": dlog}
