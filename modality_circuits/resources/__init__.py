"""Resources shipped inside the package (found with :mod:`importlib.resources`, so they work in any install).

``toy-llava/``: the trained toy checkpoint and its model card (also reachable as ``assets/toy-llava`` in a
source checkout). ``smollava/``: the SmolLLaVA delta (``delta.safetensors`` + ``delta.json``) and its model card
(``assets/smollava``); :func:`modality_circuits.smollava.materialise` turns it into a checkpoint.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def toy_model_path() -> Path:
    """The shipped toy model's directory."""
    return Path(str(files(__name__).joinpath("toy-llava")))


__all__ = ["toy_model_path"]
