"""Data: modality-conflict samples (synthetic default, real Modality-Following / MC² JSON)."""

from .matching import classify, matches, normalize_answer
from .mc2 import load_mc2, materialize, save_mc2
from .sample import CONSTRAINTS, INSTRUCTION_IMAGE, INSTRUCTION_TEXT, INSTRUCTIONS, Sample
from .synthetic import mixture, synthetic
from .variants import VARIANTS, PromptVariant, apply_variant

__all__ = ["CONSTRAINTS", "INSTRUCTIONS", "INSTRUCTION_IMAGE", "INSTRUCTION_TEXT", "VARIANTS", "PromptVariant",
           "Sample", "apply_variant", "classify", "load_mc2", "matches", "materialize", "mixture", "normalize_answer",
           "save_mc2", "synthetic"]
