"""modality_circuits: mechanistic interpretability of modality following in multimodal LLMs.

Data flows one way: model (:mod:`~modality_circuits.models`) -> prompts & spans
(:mod:`~modality_circuits.prompts`) -> interventions -> metrics -> sweeps -> figures & report.
"""

import logging

from .errors import ModalityCircuitsError
from .models import HookedMLLM
from .prompts import ChatTemplate, MLLMBatch, Segment
from .spans import Spans

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["ChatTemplate", "HookedMLLM", "MLLMBatch", "ModalityCircuitsError", "Segment", "Spans"]
