"""Knockout sweep: layers (or layer windows) × edges ``src ↛ dst`` × samples, as a tidy table.

For every batch of samples the clean run is recorded once; then, for each window start ``l0`` and each
destination group, all edges into that group run side by side in one batched forward that starts at layer
``l0`` and at the group's first position ``p0`` (see :mod:`modality_circuits.sweeps.prefix`). The score is the
binary-constrained following probability; the effect is the paper's relative change
``Δ = (p_ko − p_base) / p_base``. ``method="naive"`` runs one full forward per configuration (the reference
the tests and the benchmark compare against).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import InterventionError, SpanError
from ..interventions.core import check_layers, layer_window
from ..interventions.knockout import block_mask_hooks, edge_mask, knockout
from ..metrics import following_scores, iter_batches, relative_change
from .prefix import CleanRun

logger = logging.getLogger(__name__)

#: The paper's edges (src, dst): information moving into the instruction anchors and into the last position,
#: plus controls into the format sentence and from the system prompt.
DEFAULT_EDGES: tuple[tuple[str, str], ...] = (
    ("image", "context"), ("image", "instruction"), ("context", "instruction"),
    ("image", "last"), ("context", "last"), ("instruction", "last"),
    ("image", "constraint"), ("context", "constraint"), ("system", "last"),
)


def edge_name(src: str, dst: str) -> str:
    return f"{src}↛{dst}"


def _configs(n_layers: int, layers: Sequence[int], edges: Sequence[tuple[str, str]], window: int, mode: str
             ) -> list[dict]:
    out = []
    for layer in layers:
        win = layer_window(layer, window, n_layers, mode)
        for src, dst in edges:
            out.append({"layer": layer, "layers": win, "src": src, "dst": dst})
    return out


def _check_groups(batch: Any, edges: Sequence[tuple[str, str]]) -> None:
    for src, dst in edges:
        for g in (src, dst):
            if g not in batch.spans:
                raise SpanError(f"Edge {edge_name(src, dst)}: the prompts have no group {g!r}. "
                                f"Available groups: {batch.spans.names}.")


@torch.no_grad()
def _sweep_batch(model: Any, batch: Any, configs: list[dict], first_token: bool, method: str) -> list[dict]:
    base = following_scores(model, batch, first_token)
    B = len(batch)
    results: dict[int, Any] = {}
    if method == "naive":
        for ci, c in enumerate(configs):
            with knockout(model, batch.spans, c["src"], c["dst"], c["layers"], allow_empty=True):
                results[ci] = following_scores(model, batch, first_token).p_binary
    elif method == "cached":
        clean = CleanRun.record(model, batch)
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for ci, c in enumerate(configs):
            groups[(min(c["layers"]), c["dst"])].append(ci)
        for (l0, dst), cis in groups.items():
            p0 = int(batch.spans.first_position(dst).min())
            if p0 >= batch.seq_len:  # destination empty everywhere: nothing to knock out
                for ci in cis:
                    results[ci] = base.p_binary
                continue
            per_layer: dict[int, list[torch.Tensor]] = defaultdict(list)
            zero = torch.zeros(B, batch.seq_len, batch.seq_len, dtype=torch.bool, device=batch.tokens.device)
            layers_used = sorted({layer for ci in cis for layer in configs[ci]["layers"]})
            for ci in cis:
                m = edge_mask(batch.spans, configs[ci]["src"], dst, allow_empty=True)
                for layer in layers_used:
                    per_layer[layer].append(m if layer in configs[ci]["layers"] else zero)
            masks = {layer: torch.cat(ms) for layer, ms in per_layer.items()}  # [C*B, L, L], config-major
            with model.hooks(fwd_hooks=block_mask_hooks(masks)):
                s = following_scores(model, batch, first_token, repeats=len(cis),
                                     prompt_pass=clean.prompt_pass(model, l0, p0, len(cis), with_cache=not first_token))
            p = s.p_binary.view(len(cis), B)
            for k, ci in enumerate(cis):
                results[ci] = p[k]
    else:
        raise InterventionError(f"method must be 'cached' or 'naive', got {method!r}.")
    rows = []
    for ci, c in enumerate(configs):
        delta = relative_change(base.p_binary, results[ci])
        for i, smp in enumerate(batch.samples):
            rows.append({"sample_id": smp.id, "condition": smp.follow, "task": smp.task, "kind": smp.kind,
                         "edge": edge_name(c["src"], c["dst"]), "src": c["src"], "dst": c["dst"],
                         "layer": c["layer"], "layers": ",".join(map(str, c["layers"])),
                         "p_base": float(base.p_binary[i]), "p_ko": float(results[ci][i]), "delta": float(delta[i])})
    return rows


def knockout_sweep(model: Any, samples: Sequence[Any], edges: Sequence[tuple[str, str]] = DEFAULT_EDGES,
                   layers: Sequence[int] | None = None, window: int = 1, window_mode: str = "centered",
                   batch_size: int = 16, first_token: bool = False, method: str = "cached",
                   progress: bool = True) -> pd.DataFrame:
    """Run the knockout sweep; one row per (sample, edge, layer).

    Args:
        edges: ``(src, dst)`` group pairs; ``src ↛ dst`` blocks ``dst`` queries from ``src`` keys.
        layers: layers to centre (or start) windows at; default all.
        window / window_mode: ``k`` layers ``"centered"`` on the layer or ``"start"``-ing at it.
        method: ``"cached"`` (prefix-cached, batched configs) or ``"naive"`` (one full forward per config).

    Returns:
        Columns ``sample_id, condition, task, kind, edge, src, dst, layer, layers, p_base, p_ko, delta``.
        Aggregate with :func:`modality_circuits.metrics.summarize` (mean and 95% CI).
    """
    layers = check_layers(model, list(range(model.cfg.n_layers)) if layers is None else layers)
    configs = _configs(model.cfg.n_layers, layers, edges, window, window_mode)
    rows: list[dict] = []
    for _, batch in tqdm(list(iter_batches(model, samples, batch_size, progress=False)), desc="knockout sweep",
                         disable=not progress):
        _check_groups(batch, edges)
        rows.extend(_sweep_batch(model, batch, configs, first_token, method))
    return pd.DataFrame(rows)
