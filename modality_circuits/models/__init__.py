"""Models: HF MLLMs in TransformerLens form (one file per architecture, registered by HF class name)."""

from .base import ADAPTERS, Adapter, adapter_for, register_adapter
from .hooked_mllm import HookedMLLM

__all__ = ["ADAPTERS", "Adapter", "HookedMLLM", "adapter_for", "register_adapter"]
