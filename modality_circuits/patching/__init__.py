"""Activation patching and path patching for modality following, with image-aware clean/corrupted pairs.

:mod:`~modality_circuits.patching.pairs`
    :class:`PatchPair` (clean + corrupted batch, each with its own images) and its constructors
    :func:`instruction_flip`, :func:`image_swap`, :func:`context_swap`, ``PatchPair.from_samples/from_batches``.
:mod:`~modality_circuits.patching.activation`
    activation patching (denoising or noising) of residual streams, attention/MLP outputs, heads (``z``, ``q``,
    ``k``, ``v``, pattern) and image features, by position, token group, head or layer, batched over targets.
:mod:`~modality_circuits.patching.path`
    path patching (Wang et al. 2022) from senders (heads, a group's residual) through receivers (heads' q/k/v at
    a group, the residual at a group) to the output.
:mod:`~modality_circuits.patching.engine`
    metrics (logit difference, binary following score, callables), prefix-reusing batched runs, results.
"""

from .activation import (
                         COMPONENTS,
                         activation_patch,
                         patch_attn_out,
                         patch_head_k,
                         patch_head_out,
                         patch_head_pattern,
                         patch_head_q,
                         patch_head_v,
                         patch_image_embeds,
                         patch_mlp_out,
                         patch_resid_mid,
                         patch_resid_post,
                         patch_resid_pre,
)
from .engine import METRICS, PatchResult
from .pairs import PatchPair, align_batches, context_swap, image_swap, instruction_flip
from .path import GroupResid, HeadInputs, HeadOutputs, ResidAt, path_patch, path_patch_heads

__all__ = ["COMPONENTS", "METRICS", "GroupResid", "HeadInputs", "HeadOutputs", "PatchPair", "PatchResult", "ResidAt",
           "activation_patch", "align_batches", "context_swap", "image_swap", "instruction_flip", "patch_attn_out",
           "patch_head_k", "patch_head_out", "patch_head_pattern", "patch_head_q", "patch_head_v",
           "patch_image_embeds", "patch_mlp_out", "patch_resid_mid", "patch_resid_post", "patch_resid_pre",
           "path_patch", "path_patch_heads"]
