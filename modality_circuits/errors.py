"""Exceptions raised by modality_circuits.

Every error says what was wrong and how to fix it. All derive from :class:`ModalityCircuitsError`
(itself a ``ValueError``), so callers can catch the family at once.
"""

from __future__ import annotations


class ModalityCircuitsError(ValueError):
    """Base class of every error this library raises on bad input."""


class UnsupportedArchitectureError(ModalityCircuitsError):
    """The HF class (or its text decoder) has no registered adapter."""


class CheckpointError(ModalityCircuitsError):
    """A checkpoint directory is missing, incomplete, or in a refused format (pickle ``.bin``)."""


class WeightConversionError(ModalityCircuitsError):
    """Converted weights do not match the HookedTransformer's parameters (key or shape)."""


class ImageTokenMismatchError(ModalityCircuitsError):
    """Placeholders in the prompt do not match the images or image features given."""


class SpanError(ModalityCircuitsError):
    """A token group was asked for that the prompt does not have, or that is empty."""


class AnswerError(ModalityCircuitsError):
    """A sample's answers are unusable (identical, empty after tokenization, unknown tokens)."""


class DataFormatError(ModalityCircuitsError):
    """A data file or record is malformed; the message names the record and field."""


class InterventionError(ModalityCircuitsError):
    """An intervention was configured with out-of-range layers, heads, scales or groups."""


class NumericalError(ModalityCircuitsError):
    """A forward pass produced NaN or inf where a finite value is required."""


class PositionLimitError(ModalityCircuitsError):
    """A prompt needs more positions than the model's positional scheme computes exactly."""
