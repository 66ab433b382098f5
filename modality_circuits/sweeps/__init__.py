"""Sweeps: thin wrappers over the engine (:mod:`modality_circuits.engine`) that build intervention stacks over
layers × edges × heads × samples and return tidy tables."""

from .knockout import DEFAULT_EDGES, knockout_sweep
from .stability import nested_subsets, subset_stability

__all__ = ["DEFAULT_EDGES", "knockout_sweep", "nested_subsets", "subset_stability"]
