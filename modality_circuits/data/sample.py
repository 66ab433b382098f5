"""The modality-conflict sample: image + text context + modality instruction + question + format sentence.

A :class:`Sample` turns itself into named prompt segments in the benchmark's order (image, ``Text context: …``,
instruction, question, constraint), so that token groups are known by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import AnswerError
from ..prompts import Segment

#: The paper's two modality instructions, verbatim.
INSTRUCTION_IMAGE = ("In case there is an inconsistency between the Text Context and the input image content, "
                     "you must rely on the image content rather than the text context.")
INSTRUCTION_TEXT = ("In case there is an inconsistency between the Text Context and the input image content, "
                    "you must rely on the text context rather than the input image content.")
INSTRUCTIONS = {"image": INSTRUCTION_IMAGE, "text": INSTRUCTION_TEXT}

#: The benchmark's three format ("constraint") sentences.
CONSTRAINTS = (
    "The answer is",
    "Answer the question using a single word or phrase. The answer is",
    "Answer the question using a single word or phrase.",
)

KINDS = ("conflict", "consistent", "image_probe", "text_probe")

#: Display names of the conditions (the instructed modality), the control sample kinds and the evaluation sets:
#: the one table every figure, report and CLI line uses.
CONDITION_LABELS = {
    "image": "vision-following", "text": "text-following", "consistent": "consistent samples",
    "image_probe": "image-only probes", "text_probe": "text-only probes",
    "conflict_follow_image": "MFR vision-following", "conflict_follow_text": "MFR text-following",
}


@dataclass
class Sample:
    """One modality-following sample.

    Attributes:
        image: a PIL image (None for a text-only probe).
        context: the text context *without* the ``Text context:`` prefix (None for an image-only probe).
        instruction: the modality instruction sentence (None for probes without one).
        question: the question.
        constraint: the format sentence (None to omit).
        answer_img: the answer supported by the image.
        answer_text: the answer supported by the text context.
        follow: the instructed modality, ``"image"`` or ``"text"``.
        task: e.g. ``color``, ``shape``, ``count``, ``position``.
        kind: ``conflict`` | ``consistent`` | ``image_probe`` | ``text_probe``.
        answer_img_candidates / answer_text_candidates: accepted synonyms for open-form matching.
        variant: a :class:`~modality_circuits.data.variants.PromptVariant` (segments reordered or inserted);
            None keeps the benchmark's order.
    """

    image: Any
    context: str | None
    instruction: str | None
    question: str
    constraint: str | None
    answer_img: str
    answer_text: str
    follow: str = "image"
    task: str = ""
    kind: str = "conflict"
    answer_img_candidates: list[str] = field(default_factory=list)
    answer_text_candidates: list[str] = field(default_factory=list)
    id: str = ""
    meta: dict = field(default_factory=dict)
    variant: Any = None  # a data.variants.PromptVariant: the segments' layout (None: the benchmark's order)

    def segments(self) -> list[Segment]:
        """Named prompt segments in the benchmark's order (missing parts are left out), or in ``variant``'s layout."""
        segs: list[Segment] = []
        if self.image is not None:
            segs.append(Segment("image", image=self.image))
        if self.context is not None:
            segs.append(Segment("context", f"Text context: {self.context}"))
        if self.instruction:
            segs.append(Segment("instruction", self.instruction))
        segs.append(Segment("question", self.question))
        if self.constraint:
            segs.append(Segment("constraint", self.constraint))
        return self.variant.apply(segs) if self.variant is not None else segs

    @property
    def following_answer(self) -> str:
        """The answer of the instructed modality."""
        return self.answer_img if self.follow == "image" else self.answer_text

    @property
    def competitor_answer(self) -> str:
        """The answer of the other modality."""
        return self.answer_text if self.follow == "image" else self.answer_img

    def following_candidates(self) -> list[str]:
        c = self.answer_img_candidates if self.follow == "image" else self.answer_text_candidates
        return [self.following_answer, *c]

    def competitor_candidates(self) -> list[str]:
        c = self.answer_text_candidates if self.follow == "image" else self.answer_img_candidates
        return [self.competitor_answer, *c]

    def check_answers(self, index: int | None = None) -> None:
        """Raise :class:`AnswerError` unless the two answers are non-empty and distinct (conflict samples)."""
        where = f"sample {index}" if index is not None else f"sample {self.id or '?'}"
        for name in ("answer_img", "answer_text"):
            if not str(getattr(self, name) or "").strip():
                raise AnswerError(f"{where}: {name} is empty; every sample needs both answers.")
        if self.kind == "conflict" and self.answer_img.strip().lower() == self.answer_text.strip().lower():
            raise AnswerError(f"{where}: answer_img and answer_text are both {self.answer_img!r}; a conflict sample "
                              "needs two distinct answers (use kind='consistent' for agreeing samples).")
