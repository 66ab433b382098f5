"""Steering: add a vector to the residual stream at a token group (activation addition).

``resid_pre[layer][positions] += scale · vector`` — the residual stream entering block ``layer`` (``n_layers``:
the final residual, before the unembedding's norm) at every position of ``group``. With ``group=None`` every
position is steered, answer continuations included. A vector per sample (``[batch, d_model]``) is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, no_type_check

from torch import Tensor

from ..errors import InterventionError
from ..models.forward_state import ForwardState
from ..prompts import MLLMBatch
from ..spans import GroupSpec, check_group_spec
from .base import HookFn, Intervention
from .core import align_positions, align_rows

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM


@no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add ``scale · vector`` (``[d_model]`` or ``[batch, d_model]``) to ``resid_pre`` of ``layer`` at ``group``."""

    group: GroupSpec | None
    vector: Tensor
    layer: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.group is not None:
            object.__setattr__(self, "group", check_group_spec(self.group, "steering group"))
        if not isinstance(self.vector, Tensor) or self.vector.dim() not in (1, 2):
            raise InterventionError("Steer.vector is a tensor [d_model] or [batch, d_model].")

    def _layer(self, model: HookedMLLM) -> int:
        n = model.cfg.n_layers
        if not -n <= int(self.layer) <= n:
            raise InterventionError(f"Steering layer {self.layer} is out of range: 0..{n} ({n} = final residual).")
        return int(self.layer) % (n + 1) if self.layer >= 0 else int(self.layer) % n

    def first_layer(self, model: HookedMLLM) -> int:
        return min(self._layer(model), model.cfg.n_layers - 1)  # the final residual is block n-1's output

    def first_position(self, batch: MLLMBatch) -> int:
        return 0 if self.group is None else batch.spans.first(self.group)

    def hooks(self, model: HookedMLLM, batch: MLLMBatch) -> list[tuple[str, HookFn]]:
        layer = self._layer(model)
        if self.vector.shape[-1] != model.cfg.d_model:
            raise InterventionError(f"Steering vector has width {self.vector.shape[-1]}, the model's d_model is "
                                    f"{model.cfg.d_model}.")
        if self.vector.dim() == 2 and self.vector.shape[0] != len(batch):
            raise InterventionError(f"A per-sample steering vector has {self.vector.shape[0]} rows, the batch "
                                    f"{len(batch)}.")
        pos = None if self.group is None else batch.spans.resolve(self.group, allow_empty=True)
        vec = self.vector.detach() * float(self.scale)
        n = model.cfg.n_layers
        name = f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"

        def fn(resid: Tensor, state: ForwardState) -> Tensor:  # [rows, pos, d_model]
            v = vec.to(resid.device, resid.dtype)
            v = v[None, None] if v.dim() == 1 else align_rows(v, resid.shape[0])[:, None]
            if pos is None:
                return resid + v
            p = align_positions(pos.to(resid.device), resid.shape[0], resid.shape[1], state.offset)
            return resid + p[..., None].to(resid.dtype) * v

        return [(name, fn)]


__all__ = ["Steer"]
