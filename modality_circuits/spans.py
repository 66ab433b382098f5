"""Token-group spans: which positions of a (padded) batch belong to which named prompt segment.

Spans are *recorded while the prompt is built* from named segments (see :mod:`modality_circuits.prompts`);
they are never recovered afterwards by searching token strings. A span is stored as a boolean mask
``Bool[Tensor, "batch pos"]`` per group, so it stays right under left padding and with several images.

Standard group names: ``image`` (all image tokens; ``image.0``, ``image.1`` … per image), ``context``,
``instruction``, ``question``, ``constraint``, ``system``, ``template`` (chat-role glue), ``bos``,
``answer_prefix`` and ``last`` (the position whose logits predict the answer's first token).

**Random control groups** (the "is the instruction special, or any tokens?" control). A group named
``random<k>~<like>`` (e.g. ``random0~instruction``; :func:`random_group_name`) holds, in every row, as many positions
as ``like`` has there (the whole pool where it is smaller, with a warning), drawn uniformly without replacement
from the prompt's text groups (:data:`RANDOM_POOL`: system prompt and user-turn text) outside ``like``; draw ``k``
of a sample is seeded by ``(seed, k, the sample's id)``, so it does not depend on how samples are batched.
:func:`with_random_groups` adds the groups a list of names asks for.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._types import Bool, Int
from .errors import SpanError

logger = logging.getLogger(__name__)

#: Names every analysis knows about; any other segment name is a user-named group.
STANDARD_GROUPS = ("image", "context", "instruction", "question", "constraint", "system", "last")

#: How every public function names a token group: a group name, several names (their union), or an explicit
#: ``Bool[Tensor, "batch pos"]`` mask. Resolved in one place, :meth:`Spans.resolve`.
GroupSpec = str | Sequence[str] | Tensor


def check_group_spec(spec: object, what: str = "group") -> object:
    """Validate a :data:`GroupSpec` at the call (not inside a hook); returns it with lists made tuples.

    Raises:
        SpanError: ``spec`` is not a non-empty name, a sequence of names, or a boolean tensor.
    """
    if isinstance(spec, str) and spec:
        return spec
    if isinstance(spec, Tensor):
        if spec.dim() != 2:
            raise SpanError(f"A {what} given as a mask must be Bool[batch, pos]; got shape {tuple(spec.shape)}.")
        return spec.bool()
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(x, str) and x for x in spec):
        return tuple(spec)
    raise SpanError(f"A {what} is a token-group name, a list of names, or a Bool[batch, pos] mask; got {spec!r}.")


@dataclass
class Spans:
    """Per-group position masks for a batch.

    Attributes:
        masks: group name -> ``Bool[Tensor, "batch pos"]``.
    """

    masks: dict[str, Bool[Tensor, "batch pos"]] = field(default_factory=dict)

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        return list(self.masks)

    @property
    def batch_size(self) -> int:
        return next(iter(self.masks.values())).shape[0] if self.masks else 0

    @property
    def seq_len(self) -> int:
        return next(iter(self.masks.values())).shape[1] if self.masks else 0

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def mask(self, name: str | Sequence[str], allow_empty: bool = False) -> Bool[Tensor, "batch pos"]:
        """Boolean mask of a group (or the union of several groups).

        Raises:
            SpanError: the prompt has no such group (lists the available ones), or the group has no
                token in some sample and ``allow_empty`` is False.
        """
        if isinstance(name, (list, tuple)):
            out = torch.zeros_like(next(iter(self.masks.values())))
            for n in name:
                out = out | self.mask(n, allow_empty=True)
            if not allow_empty:
                self._check_nonempty(out, "+".join(name))
            return out
        if not isinstance(name, str) or not name:
            raise SpanError(f"A token group name must be a non-empty string, got {name!r}. Available: {self.names}.")
        if name not in self.masks:
            raise SpanError(
                f"The prompt has no token group {name!r}. Available groups: {self.names}. "
                "Groups are the segment names the prompt was built from (plus 'last')."
            )
        m = self.masks[name]
        if not allow_empty:
            self._check_nonempty(m, name)
        return m

    __getitem__ = mask

    def resolve(self, spec: GroupSpec, allow_empty: bool = False) -> Bool[Tensor, "batch pos"]:
        """A :data:`GroupSpec` (name, names, or explicit mask) -> ``Bool[Tensor, "batch pos"]`` (the one place
        group specifications are resolved)."""
        spec = check_group_spec(spec)
        if isinstance(spec, Tensor):
            if tuple(spec.shape) != (self.batch_size, self.seq_len):
                raise SpanError(f"A group mask has shape {tuple(spec.shape)}, the batch is "
                                f"{(self.batch_size, self.seq_len)} (batch, pos).")
            return spec
        return self.mask(spec if isinstance(spec, str) else list(spec), allow_empty=allow_empty)

    def first(self, spec: GroupSpec) -> int:
        """The first position of a group over the whole batch (``seq_len`` if it is empty everywhere)."""
        m = self.resolve(spec, allow_empty=True)
        hit = m.any(0).nonzero().flatten()
        return int(hit[0]) if len(hit) else self.seq_len

    def _check_nonempty(self, m: Tensor, name: str) -> None:
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise SpanError(
                f"Token group {name!r} is empty in sample(s) {empty}: its segment produced no tokens. "
                "Give the segment some text, drop those samples, or pass allow_empty=True."
            )

    def positions(self, name: str, i: int) -> Int[Tensor, " n"]:
        """Positions (in the padded sequence) of group ``name`` in sample ``i``."""
        return self.mask(name, allow_empty=True)[i].nonzero().flatten()

    def first_position(self, name: str | Sequence[str]) -> Int[Tensor, " batch"]:
        """First position of the group in each sample (``seq_len`` where the group is empty)."""
        m = self.mask(name, allow_empty=True)
        pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
        return torch.where(m, pos, torch.full_like(pos, m.shape[1])).min(dim=1).values

    def counts(self) -> dict[str, list[int]]:
        """Number of tokens per group per sample (a quick sanity view)."""
        return {k: v.sum(dim=1).tolist() for k, v in self.masks.items()}

    # -------------------------------------------------------------- transforms
    def select(self, index: Sequence[int] | Tensor) -> Spans:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Spans({k: v[idx.to(v.device)] for k, v in self.masks.items()})

    def to(self, device: torch.device | str) -> Spans:
        return Spans({k: v.to(device) for k, v in self.masks.items()})

    def with_group(self, name: str, mask: Bool[Tensor, "batch pos"]) -> Spans:
        """A copy with an extra (user-defined) group, e.g. explicit positions."""
        if mask.shape != (self.batch_size, self.seq_len):
            raise SpanError(f"Mask for group {name!r} has shape {tuple(mask.shape)}, expected "
                            f"{(self.batch_size, self.seq_len)} (batch, pos).")
        return Spans({**self.masks, name: mask.bool()})

    @staticmethod
    def concat(spans: Iterable[Spans]) -> Spans:
        spans = list(spans)
        names = spans[0].names
        return Spans({n: torch.cat([s.masks[n] for s in spans]) for n in names})


def positions_to_mask(positions: Sequence[Sequence[int]] | Sequence[int], batch: int, seq_len: int) -> Tensor:
    """Explicit positions -> ``Bool[Tensor, "batch pos"]``; a flat list applies to every sample."""
    m = torch.zeros(batch, seq_len, dtype=torch.bool)
    if len(positions) and isinstance(positions[0], int):
        positions = [positions] * batch  # type: ignore[list-item]
    for i, ps in enumerate(positions):  # type: ignore[arg-type]
        for p in ps:
            if not -seq_len <= p < seq_len:
                raise SpanError(f"Position {p} is out of range for a sequence of length {seq_len}.")
            m[i, p] = True
    return m


#: The groups a random control set is drawn from (minus the group it mimics): the system prompt and the user turn's
#: text. The system prompt is in the pool because on short prompts the user turn alone is barely larger than the
#: instruction (SmolLLaVA: 29 other user-turn tokens on average for a 30-token instruction), so a same-size set
#: drawn from it alone would be nearly the whole user turn.
RANDOM_POOL = ("system", "context", "instruction", "question", "constraint")
_RANDOM = re.compile(r"^random(\d+)~(.+)$")


def random_group_name(like: str, k: int = 0) -> str:
    """The name of random control set ``k`` mimicking group ``like`` (``random0~instruction``)."""
    return f"random{k}~{like}"


def parse_random_group(name: str) -> tuple[int, str] | None:
    """``(k, like)`` for a random control group's name, else None."""
    m = _RANDOM.match(name) if isinstance(name, str) else None
    return (int(m.group(1)), m.group(2)) if m else None


def random_like(spans: Spans, like: str, sample_ids: Sequence[str], k: int = 0, seed: int = 0,
                pool: Sequence[str] = RANDOM_POOL) -> Bool[Tensor, "batch pos"]:
    """Per row, ``|like|`` positions drawn from ``pool`` groups outside ``like`` (seeded by seed, k, sample id).

    A row whose pool has fewer positions than ``like`` gets the whole pool (a smaller set), with a warning that
    names the samples: a short prompt cannot hold a same-size random set.

    Raises:
        SpanError: ``like`` is not a group of the batch, or the ids do not match the rows.
    """
    if like not in spans:
        raise SpanError(f"Random control group: the prompts have no group {like!r} to mimic. "
                        f"Available groups: {spans.names}.")
    if len(sample_ids) != spans.batch_size:
        raise SpanError(f"random_like needs one sample id per row: {len(sample_ids)} ids for {spans.batch_size} rows.")
    target = spans.mask(like, allow_empty=True)
    groups = [g for g in pool if g != like and g in spans]
    source = (spans.mask(groups, allow_empty=True) if groups else torch.zeros_like(target)) & ~target
    out = torch.zeros_like(target)
    short = []
    for i, sid in enumerate(sample_ids):
        n = int(target[i].sum())
        cand = source[i].nonzero().flatten()
        if n > len(cand):
            short.append(f"{sid} ({len(cand)} of {n})")
            n = len(cand)
        rng = np.random.default_rng([seed, k, zlib.crc32(str(sid).encode())])
        out[i, cand[torch.as_tensor(rng.choice(len(cand), n, replace=False), dtype=torch.long)]] = True
    if short:
        logger.warning("random stand-in for %r: the pool (%s) is smaller than the group in %d sample(s); they get "
                       "the whole pool: %s", like, ", ".join(groups) or "nothing", len(short), ", ".join(short[:5]))
    return out


def with_random_groups(spans: Spans, names: Iterable[str], sample_ids: Sequence[str], seed: int = 0) -> Spans:
    """``spans`` plus every random control group among ``names`` (others are ignored)."""
    for name in dict.fromkeys(names):
        parsed = parse_random_group(name)
        if parsed is not None and name not in spans:
            k, like = parsed
            spans = spans.with_group(name, random_like(spans, like, sample_ids, k, seed))
    return spans
