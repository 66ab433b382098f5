"""Interventions, all as TransformerLens hooks inside context managers: knockout, head ablation/amplification."""

from .core import apply, layer_window
from .heads import (amplify_attention, amplify_heads, attention_scale_hooks, block_heads, head_scale_hooks,
                    mean_z, scale_tensor_hooks)
from .knockout import edge_mask, knockout, knockout_hooks, mask_scores

__all__ = ["amplify_attention", "amplify_heads", "apply", "attention_scale_hooks", "block_heads", "edge_mask",
           "head_scale_hooks", "knockout", "knockout_hooks", "layer_window", "mask_scores", "mean_z",
           "scale_tensor_hooks"]
