"""Activation and path patching per layer as work units (:mod:`modality_circuits.sweeps.units`).

The patching pairs are few (a handful to a few hundred) and every patch target needs the whole pair set (scores are
means over the pair), so these sweeps are split along **layers**, not samples: a unit is ``per_unit`` layers × all
pairs, its rows written as one Parquet file. The pairs are rebuilt from the samples inside each unit (on any
worker), and every unit's rows are those of the same call restricted to its layers.

* :func:`flip_patching`: residual-stream activation patching by token group for the instruction-flip pair
  (``patch_resid_pre(..., by="group")``), one row per (layer, group).
* :func:`image_path_patching`: path patching ``image@0 → {instruction, last} residual @ layer`` for the image-swap
  pair, one row per (receiver, layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..sweeps.units import sweep_in_units
from .activation import patch_resid_pre
from .pairs import image_swap, instruction_flip
from .path import GroupResid, ResidAt, path_patch

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

PATH_COLUMNS = ["sender", "receiver", "layer", "value", "effect", "n"]


@dataclass(frozen=True)
class LayerItem:
    """One layer as a work item (``id`` keys it in the unit plan)."""

    id: str
    layer: int


def _items(layers: Sequence[int]) -> list[LayerItem]:
    return [LayerItem(f"layer-{int(layer):03d}", int(layer)) for layer in layers]


def flip_rows(model: HookedMLLM, items: Sequence[LayerItem], *, samples: Sequence[Any]) -> pd.DataFrame:
    """One unit of :func:`flip_patching`: the instruction-flip pair's group patching at ``items``' layers."""
    pair = instruction_flip(model, list(samples))
    return patch_resid_pre(model, pair, by="group", layers=[it.layer for it in items]).to_frame()


def image_path_rows(model: HookedMLLM, items: Sequence[LayerItem], *, samples: Sequence[Any],
                    donors: Sequence[Any], receivers: Sequence[str] = ("instruction", "last")) -> pd.DataFrame:
    """One unit of :func:`image_path_patching` (``items``' layers)."""
    pair = image_swap(model, list(samples), list(donors))
    rows = []
    for it in items:
        for g in receivers:
            r = path_patch(model, pair, GroupResid("image", 0), ResidAt(g, it.layer))
            rows.append({"sender": "image@0", "receiver": g, "layer": it.layer, "value": float(r.values),
                         "effect": float(r.effect), "n": len(pair)})
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


def flip_patching(model: HookedMLLM, samples: Sequence[Any], layers: Sequence[int], per_unit: int | None = None,
                  units_dir: str | Path | None = None, executor: Any = None, progress: bool = False
                  ) -> pd.DataFrame | None:
    """Group patching of the instruction-flip pair of ``samples`` at ``layers`` (``layer, group, value, raw, …``;
    1 = the clean run restored). ``per_unit`` layers per work unit (default: all in one)."""
    params = {"sweep": "patching/flip", "samples": [s.id for s in samples]}
    return sweep_in_units(model, _items(layers), flip_rows, {"samples": list(samples)}, params, units_dir,
                          per_unit or max(1, len(layers)), None, 1, progress, "patching: instruction flip", executor)


def image_path_patching(model: HookedMLLM, samples: Sequence[Any], donors: Sequence[Any], layers: Sequence[int],
                        per_unit: int = 1, units_dir: str | Path | None = None, executor: Any = None,
                        progress: bool = False) -> pd.DataFrame | None:
    """Path patching image@0 → {instruction, last} residual at each of ``layers`` for the image-swap pair
    (``samples`` with ``donors``' images); columns :data:`PATH_COLUMNS`."""
    if not samples:
        return pd.DataFrame(columns=PATH_COLUMNS)
    params = {"sweep": "patching/path", "samples": [s.id for s in samples], "donors": [d.id for d in donors]}
    return sweep_in_units(model, _items(layers), image_path_rows, {"samples": list(samples), "donors": list(donors)},
                          params, units_dir, per_unit, None, 1, progress, "patching: image paths", executor)


__all__ = ["PATH_COLUMNS", "LayerItem", "flip_patching", "flip_rows", "image_path_patching", "image_path_rows"]
