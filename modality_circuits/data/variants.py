"""Prompt variants as data: reorder a sample's segments and insert new ones, spans still recorded exactly.

The rebuttal's "position, not meaning?" control moves the modality instruction and inserts text after it; if the
instruction tokens matter because of *where* they sit, the knockout curves move with them. A
:class:`PromptVariant` is a frozen description (which segment goes where, what is inserted after which segment);
:func:`apply_variant` gives each sample that layout. The prompt builder records every segment's tokens as it
builds the prompt, so a moved or inserted segment is its own exact token group (inserted segments are named by
the variant, e.g. ``filler``). Nothing searches strings afterwards.

Built-in variants (:data:`VARIANTS`): ``original``, ``instruction_after_question``,
``swap_instruction_constraint`` and ``filler_after_instruction`` (the rebuttal's long system-style sentence after the
instruction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DataFormatError
from ..prompts import Segment

#: The rebuttal's inserted sentence (a system-prompt-like filler after the instruction).
FILLER = ("You are a helpful and honest assistant who strictly follows all user instructions and provides accurate "
          "responses based on the information you are given.")


@dataclass(frozen=True)
class PromptVariant:
    """A layout of a sample's segments.

    Attributes:
        name: the variant's name (recorded in tables as ``variant``).
        order: segment names in their new order: the named segments are laid out in this order in the places they
            occupied, every other segment stays where it was (``()``: the original order; names a sample lacks are
            skipped). ``("question", "instruction")`` puts the instruction after the question.
        inserts: ``(after, name, text)``: a new text segment ``name`` right after segment ``after``.
    """

    name: str
    order: tuple[str, ...] = ()
    inserts: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.order)) != len(self.order):
            raise DataFormatError(f"Prompt variant {self.name!r}: a segment is named twice in order={self.order}.")
        for after, name, text in self.inserts:
            if not name or not text:
                raise DataFormatError(f"Prompt variant {self.name!r}: an insert after {after!r} needs a name and text.")

    def apply(self, segments: Sequence[Segment]) -> list[Segment]:
        """The segments in this variant's layout (a new list; the input is not changed)."""
        segs = list(segments)
        names = [s.name for s in segs]
        if self.order:
            named = [n for n in self.order if n in names]
            if len(named) > 1:
                slots = sorted(names.index(n) for n in named)  # the named segments swap among their own places
                by_name = {s.name: s for s in segs}
                for slot, n in zip(slots, named):
                    segs[slot] = by_name[n]
        for after, name, text in self.inserts:
            where = [i for i, s in enumerate(segs) if s.name == after]
            if not where:
                raise DataFormatError(f"Prompt variant {self.name!r}: the sample has no segment {after!r} to insert "
                                      f"{name!r} after; segments: {[s.name for s in segs]}.")
            if any(s.name == name for s in segs):
                raise DataFormatError(f"Prompt variant {self.name!r}: the sample already has a segment {name!r}.")
            segs.insert(where[0] + 1, Segment(name, text))
        return segs


VARIANTS: dict[str, PromptVariant] = {v.name: v for v in (
    PromptVariant("original"),
    PromptVariant("instruction_after_question", order=("question", "instruction")),
    PromptVariant("swap_instruction_constraint", order=("constraint", "instruction")),
    PromptVariant("filler_after_instruction", inserts=(("instruction", "filler", FILLER),)),
)}


def apply_variant(samples: Sequence, variant: PromptVariant | str) -> list:
    """Copies of ``samples`` laid out as ``variant`` (a :class:`PromptVariant` or a name in :data:`VARIANTS`)."""
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise DataFormatError(f"Unknown prompt variant {variant!r}; built-in: {sorted(VARIANTS)}.")
        variant = VARIANTS[variant]
    return [dataclasses.replace(s, variant=variant) for s in samples]


__all__ = ["FILLER", "VARIANTS", "PromptVariant", "apply_variant"]
