"""What one forward pass needs besides its input, scoped to that pass: no run state lives on the model.

A HookedTransformer forward only passes tensors from block to block. Two facts about a forward are not in those
tensors and are needed inside it:

* ``offset``: the absolute position of the first input position (the KV-cached prefix length). Intervention
  hooks on position-indexed activations (``hook_z``, ``hook_resid_pre`` …) use it to align their token-group
  masks, which are in prompt coordinates.
* ``rope_positions``: the architecture's rotary positions of the whole prompt (M-RoPE: ``[3, batch, pos]``),
  which the M-RoPE attention reads.
* ``attention_blocks``: the prompt's bidirectional attention blocks (Gemma 3: each image's tokens attend to each
  other both ways), which the block-mask attention reads.
* ``deepstack``: Qwen3-VL's extra image features, which its first decoder blocks add at the image positions.

:meth:`HookedMLLM.forward <modality_circuits.models.HookedMLLM.forward>` computes both from its arguments (the
batch carries the rotary positions) and publishes them with :func:`forward_scope` for the duration of the call
only: the previous state is restored when the call returns or raises, so no forward depends on what an earlier
forward did. Hooks receive the state as an explicit argument (see
:func:`modality_circuits.interventions.base.tl_hook`); only the M-RoPE and block-mask attentions read
:func:`current` (and Qwen3-VL's DeepStack blocks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ForwardState:
    """The state of the forward pass being computed.

    Attributes:
        offset: absolute position of the first input position (number of KV-cached positions before it).
        rope_positions: ``Int[Tensor, "3 batch pos"]`` M-RoPE positions of the whole prompt, or None (1-D
            positions from the attention mask, TransformerLens's rule).
        attention_blocks: ``Int[Tensor, "batch pos"]`` block id of every prompt position (``-1``: not in a block);
            queries and keys of one block see each other regardless of order. None: causal attention only.
    """

    offset: int = 0
    rope_positions: Tensor | None = None
    attention_blocks: Tensor | None = None
    deepstack: DeepStack | None = None


@dataclass(frozen=True)
class DeepStack:
    """Extra image features added to the residual stream after the first decoder blocks (Qwen3-VL's DeepStack).

    Attributes:
        features: per block ``k``, ``Float[Tensor, "img_tok d_model"]``, in the order of the image tokens of the
            prompt (row-major over ``[batch, pos]``, as the main image features).
        image_mask: ``Bool[Tensor, "batch pos"]`` the image positions of the whole prompt.
    """

    features: tuple[Tensor, ...]
    image_mask: Tensor


_STATE: ContextVar[ForwardState] = ContextVar("modality_circuits_forward_state",
                                              default=ForwardState())  # noqa: B039 (frozen: immutable)


def current() -> ForwardState:
    """The state of the innermost forward pass running now (the default state outside any forward)."""
    return _STATE.get()


@contextmanager
def forward_scope(state: ForwardState) -> Iterator[ForwardState]:
    """Publish ``state`` for the duration of a ``with`` block; the previous state is restored on exit."""
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)
