"""Interventions as frozen dataclasses that declare where they act (first layer, first position) and produce hooks
for one copy of a batch; any stack of them runs side by side along a ``config`` axis (see :mod:`.base`).

================  ==========================================================================================
``Knockout``      ``src ↛ dst`` attention knockout at layers (and heads)
``ScaleHeads``    ``z' = b + α (z − b)``: zero/mean ablation (α = 0) and amplification (α > 1) of heads
``ScaleAttention`` scale heads' attention from one group to another by α (renormalised)
``Steer``         add a vector to the residual stream at a token group
``Patch``         overwrite an activation with another run's values at a site (activation/path patching)
================  ==========================================================================================

Use ``with iv.applied(model, batch): …`` around any code, or :func:`modality_circuits.engine.run` to score many
configurations in one prefix-cached batched forward. Context-manager forms: :func:`knockout`, :func:`block_heads`,
:func:`amplify_heads`, :func:`amplify_attention`.
"""

from .base import Intervention, apply, apply_stack, config_hooks
from .core import layer_window
from .heads import (
                    ScaleAttention,
                    ScaleHeads,
                    amplify_attention,
                    amplify_heads,
                    attention_scale_hooks,
                    block_heads,
                    head_scale_hooks,
                    mean_z,
)
from .knockout import Knockout, edge_mask, knockout, knockout_hooks, mask_scores
from .patch import Patch
from .steer import Steer

__all__ = ["Intervention", "Knockout", "Patch", "ScaleAttention", "ScaleHeads", "Steer", "amplify_attention",
           "amplify_heads", "apply", "apply_stack", "attention_scale_hooks", "block_heads", "config_hooks", "edge_mask",
           "head_scale_hooks", "knockout", "knockout_hooks", "layer_window", "mask_scores", "mean_z"]
