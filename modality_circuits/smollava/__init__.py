"""SmolLLaVA, the real-LM default: a LLaVA on the pretrained SmolLM2-135M-Instruct decoder.

- :mod:`.build`: assemble the ``LlavaForConditionalGeneration`` (base decoder + new vision side + ``<image>``);
- :mod:`.train`: LLaVA's two-stage recipe with LoRA adapters (``modality-circuits train-smollava``);
- :mod:`.delta`: the shipped delta (only what training changed) and its exact merge into a plain LLaVA checkpoint
  in the cache (:func:`~.delta.materialise`), which :class:`~modality_circuits.HookedMLLM` loads like any other.
"""

from .build import CHAT_TEMPLATE, IMAGE_TOKEN, SMOL_SYSTEM, VisionSpec, build_smollava, save_smollava
from .delta import materialise, read_delta, shipped_delta

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "SMOL_SYSTEM", "VisionSpec", "build_smollava", "materialise", "read_delta",
           "save_smollava", "shipped_delta"]
