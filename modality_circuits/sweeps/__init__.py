"""Sweeps: batched, prefix-cached runs over layers × edges × heads × samples, returning tidy tables."""

from .knockout import DEFAULT_EDGES, knockout_sweep
from .prefix import CleanRun

__all__ = ["DEFAULT_EDGES", "CleanRun", "knockout_sweep"]
