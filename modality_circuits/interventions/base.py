"""The intervention abstraction: frozen dataclasses that say where they act and produce hooks for one copy of a batch.

An :class:`Intervention` declares

* ``first_layer(model)``: the first layer whose computation it can change, and
* ``first_position(batch)``: the first (padded) position it can change (attention is causal, so nothing before
  it moves),

and produces ``hooks(model, batch)``: ``(hook name, fn)`` pairs where ``fn(act, state) -> act`` edits the
activation of **one copy** of the batch (``B`` rows, or a multiple of ``B`` when answer continuations repeat it)
and receives the running forward's :class:`~modality_circuits.models.forward_state.ForwardState` explicitly
(``state.offset`` = absolute position of the activation's first position under a KV cache).

A *configuration* is one intervention or a tuple of them (applied together). :func:`config_hooks` runs ``C``
configurations side by side along a ``config`` axis in one batched forward (penzai's "worlds"): the forward's
rows are ``C`` config-major copies of the batch (copy ``j`` = rows ``j·B … (j+1)·B − 1``, repeated again for
answer continuations), and each hook name gets one dispatcher that hands every copy to its own configuration's
functions. The engine (:mod:`modality_circuits.engine`) starts such a forward at the configurations' smallest
``first_layer`` and ``first_position``; :meth:`Intervention.applied` is the same thing for one configuration
around any code (hooks removed on exit, even on error).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InterventionError
from ..models.forward_state import ForwardState, current
from ..prompts import MLLMBatch

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

#: ``fn(activation of one copy, state of the running forward) -> edited activation``.
HookFn = Callable[[Tensor, ForwardState], Tensor]
#: What TransformerLens attaches: ``(hook name, fn(act, hook))``.
TLHook = tuple[str, Callable[..., Any]]

#: Activations that are not ``[rows, …]``-indexed: their first axis is the image tokens of the batch, copy-major.
IMAGE_HOOKS = ("hook_image_embeds",)


@dataclass(frozen=True, eq=False)
class Intervention:
    """Base class of interventions (frozen dataclasses). Subclasses implement the three methods."""

    def first_layer(self, model: HookedMLLM) -> int:
        """The first layer whose computation this intervention can change."""
        raise NotImplementedError

    def first_position(self, batch: MLLMBatch) -> int:
        """The first padded position this intervention can change (0: possibly any)."""
        return 0

    def hooks(self, model: HookedMLLM, batch: MLLMBatch) -> list[tuple[str, HookFn]]:
        """Hooks editing one copy of ``batch``. Validates arguments (clear errors at the call, not in a hook)."""
        raise NotImplementedError

    def applied(self, model: HookedMLLM, batch: MLLMBatch) -> Any:
        """Context manager: every forward inside runs with this intervention (hooks removed on exit)."""
        return apply(model, batch, self)


Config = Intervention | Sequence[Intervention]


def as_config(config: Config) -> tuple[Intervention, ...]:
    """One configuration as a tuple of interventions (type-checked)."""
    items = (config,) if isinstance(config, Intervention) else tuple(config)
    bad = [x for x in items if not isinstance(x, Intervention)]
    if bad:
        raise InterventionError(f"A configuration is an Intervention or a sequence of them; got {bad[0]!r}.")
    return items


def first_layer(model: HookedMLLM, configs: Sequence[Config]) -> int:
    """The smallest first layer over configurations (``n_layers`` when none changes anything)."""
    return min((iv.first_layer(model) for c in configs for iv in as_config(c)), default=model.cfg.n_layers)


def first_position(batch: MLLMBatch, configs: Sequence[Config]) -> int:
    """The smallest first position over configurations (``seq_len`` when none changes anything)."""
    return min((iv.first_position(batch) for c in configs for iv in as_config(c)), default=batch.seq_len)


def _compose(fns: list[HookFn]) -> HookFn:
    if len(fns) == 1:
        return fns[0]

    def fn(act: Tensor, state: ForwardState) -> Tensor:
        for f in fns:
            act = f(act, state)
        return act
    return fn


def config_hooks(model: HookedMLLM, batch: MLLMBatch | None, configs: Sequence[Config]) -> list[TLHook]:
    """TransformerLens hooks running ``configs`` side by side (copy ``j`` of the batch gets configuration ``j``).

    Works for any forward whose rows are copies of ``batch`` in config-major order, repeated any number of times
    (answer continuations): block ``t`` of ``B`` rows belongs to configuration ``t mod C``. ``batch`` may be None
    for one configuration whose interventions need no spans (e.g. heads scaled at every position).
    """
    C = len(configs)
    if batch is None and C > 1:
        raise InterventionError("Configurations side by side need the batch they are copies of.")
    B = len(batch) if batch is not None else 0
    per_name: dict[str, list[HookFn | None]] = defaultdict(lambda: [None] * C)
    for j, c in enumerate(configs):
        fns: dict[str, list[HookFn]] = defaultdict(list)
        for iv in as_config(c):
            for name, fn in iv.hooks(model, batch):
                fns[name].append(fn)
        for name, fl in fns.items():
            per_name[name][j] = _compose(fl)
    n_img = int((batch.tokens == model.image_encoder.image_token_id).sum()) if batch is not None else 0

    def make(name: str, fns: list[HookFn | None]) -> Callable[..., Tensor]:
        unit = n_img if name in IMAGE_HOOKS else B

        def dispatch(act: Tensor, hook: Any) -> Tensor:
            state = current()
            if C == 1 and fns[0] is not None:
                return fns[0](act, state)
            n = act.shape[0]
            if unit == 0 or n % unit:
                raise InterventionError(f"{name}: an activation with {n} rows is not copies of the {unit}-row "
                                        "batch the interventions were built for; run the batch they were built from.")
            parts = list(act.split(unit))
            changed = False
            for t, part in enumerate(parts):
                fn = fns[t % C]
                if fn is not None:
                    parts[t] = fn(part, state)
                    changed = True
            return torch.cat(parts) if changed else act
        return dispatch

    return [(name, make(name, fns)) for name, fns in per_name.items() if any(f is not None for f in fns)]


@contextmanager
def apply(model: HookedMLLM, batch: MLLMBatch | None, *interventions: Intervention) -> Iterator[HookedMLLM]:
    """Context manager: every forward inside runs with all ``interventions`` (one configuration)."""
    with model.hooks(fwd_hooks=config_hooks(model, batch, [tuple(interventions)])):
        yield model


@contextmanager
def apply_stack(model: HookedMLLM, batch: MLLMBatch, configs: Sequence[Config]) -> Iterator[HookedMLLM]:
    """Context manager for a forward over ``len(configs)`` config-major copies of ``batch``."""
    with model.hooks(fwd_hooks=config_hooks(model, batch, configs)):
        yield model
