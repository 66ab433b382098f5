"""Models: HF MLLMs in TransformerLens form (one file per architecture, registered by HF class name).

Every module of this package is imported here, so an architecture file that decorates its adapter with
:func:`~modality_circuits.models.base.register_adapter` is available as soon as the package is: a new architecture
is one file (plus its tiny test builder), with no list to edit.
"""

import importlib
import pkgutil

from .base import ADAPTERS, Adapter, adapter_for, register_adapter
from .hooked_mllm import HookedMLLM

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")  # architecture files register their adapters

__all__ = ["ADAPTERS", "Adapter", "HookedMLLM", "adapter_for", "register_adapter"]
