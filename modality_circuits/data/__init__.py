"""Data: modality-conflict samples (synthetic default, real Modality-Following / MC² JSON)."""

from .sample import CONSTRAINTS, INSTRUCTION_IMAGE, INSTRUCTION_TEXT, INSTRUCTIONS, Sample

__all__ = ["CONSTRAINTS", "INSTRUCTIONS", "INSTRUCTION_IMAGE", "INSTRUCTION_TEXT", "Sample"]
