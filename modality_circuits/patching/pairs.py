"""Clean/corrupted prompt pairs for patching modality following, and how their token groups are aligned.

A :class:`PatchPair` holds a *clean* and a *corrupted* :class:`~modality_circuits.prompts.MLLMBatch` (each with
its own images) whose token groups sit at the same positions, plus the two answers the metric compares for each
row: ``(clean answer, corrupted answer)``.

Constructors:

* :func:`instruction_flip` — same image and context, the other modality instruction (and ``follow`` flipped);
* :func:`image_swap` — same text, the image (and image answer) of a donor sample;
* :func:`context_swap` — same image, the text context (and text answer) of a donor sample;
* :meth:`PatchPair.from_samples` / :meth:`PatchPair.from_batches` — any two prompts.

**Alignment rule.** Patching moves an activation at position ``p`` of one run to position ``p`` of the other,
so every token group must occupy the same positions in both batches. :meth:`PatchPair.from_batches` with
``align=False`` checks exactly that (same batch size, length, padding and group masks) and names the first
mismatching group. With ``align=True`` (the default of the sample-based constructors) the two prompts of a row
are walked segment by segment (runs of one group, e.g. ``system, template, image.0, context, instruction, …``);
the segment order must be the same, and where a segment has fewer tokens in one prompt (the two instructions
differ in length: "…rely on the **image content** rather than the text context." vs "…rely on the **text
context** rather than the input image content."), *masked pad slots* (pad token, attention mask 0) are inserted
right after that segment's last token (right before it for the prompt's final segment, so the last position
stays a real token). Rotary positions count attended tokens only and no query attends to a masked key, so a pad
slot changes no output of the real tokens (tested: logits agree to float precision). Afterwards every group with
the same token count in both prompts sits at identical positions; a group whose counts differ is recorded in
:attr:`PatchPair.unaligned` and can be patched position by position but **not as a whole group** (that raises a
clear error), because its tokens do not correspond one to one. A patch into a pad slot has no effect (nothing
attends to it), so with an unaligned group even patching every position does not fully restore the other run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._types import Bool
from ..data.sample import INSTRUCTIONS
from ..errors import AnswerError, SpanError
from ..prompts import MLLMBatch
from ..spans import Spans

if TYPE_CHECKING:
    from ..models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)

#: Groups that are unions of other groups (skipped when segments are walked).
AGGREGATE_GROUPS = ("image", "last")
_SUBIMAGE = re.compile(r"^image\.\d+$")


@dataclass
class PatchPair:
    """A clean and a corrupted batch with aligned token groups.

    Attributes:
        clean: the batch whose behaviour patching restores (denoising) or destroys (noising).
        corrupted: the batch that differs in one factor (instruction, image, context …).
        answers: per row ``(clean answer, corrupted answer)``: the named metrics score the clean answer against
            the corrupted one (None: only callable metrics work).
        kind: ``instruction``, ``image``, ``context`` or ``custom``.
        unaligned: groups whose token counts differ between the two prompts (patchable only by position).
    """

    clean: MLLMBatch
    corrupted: MLLMBatch
    answers: list[tuple[str, str]] | None = None
    kind: str = "custom"
    unaligned: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.answers is not None:
            if len(self.answers) != len(self.clean):
                raise AnswerError(f"Got {len(self.answers)} answer pairs for {len(self.clean)} prompts.")
            self.answers = [(str(a), str(b)) for a, b in self.answers]
            for i, (a, b) in enumerate(self.answers):
                if a.strip().lower() == b.strip().lower():
                    raise AnswerError(f"Row {i}: the clean and corrupted answers are both {a!r}; the metric needs "
                                      "two different answers (pass answers=[(clean, corrupted), …]).")

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def seq_len(self) -> int:
        return self.clean.seq_len

    @property
    def groups(self) -> list[str]:
        """Groups patchable as a whole (aligned, non-empty somewhere), in prompt order."""
        sp = self.clean.spans
        names = [n for n in sp.names if n not in self.unaligned and bool(sp.masks[n].any())]
        n_img = sum(1 for n in names if _SUBIMAGE.match(n))
        if n_img <= 1:
            names = [n for n in names if not _SUBIMAGE.match(n)]
        first = {n: int(sp.first_position(n).min()) for n in names}
        return sorted(names, key=lambda n: (n == "last", first[n]))

    def group_mask(self, group: str | Sequence[str]) -> Bool[Tensor, "batch pos"]:
        """Mask of a group (or union of groups) that is aligned in both batches.

        Raises:
            SpanError: unknown group (lists the available ones), or a group whose tokens do not correspond
                between the clean and corrupted prompts.
        """
        names = [group] if isinstance(group, str) else list(group)
        for g in names:
            if g in self.unaligned:
                raise SpanError(_unaligned_message(self.clean.spans, self.corrupted.spans, g))
        m = self.clean.spans.mask(names if len(names) > 1 else names[0], allow_empty=True)
        m2 = self.corrupted.spans.mask(names if len(names) > 1 else names[0], allow_empty=True)
        if not torch.equal(m.cpu(), m2.cpu()):
            raise SpanError(f"Token group {group!r} sits at different positions in the clean and corrupted batches.")
        return m

    def select(self, index: Sequence[int]) -> PatchPair:
        index = list(index)
        return PatchPair(self.clean.select(index), self.corrupted.select(index),
                         [self.answers[i] for i in index] if self.answers is not None else None, self.kind,
                         self.unaligned)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_batches(cls, clean: MLLMBatch, corrupted: MLLMBatch, answers: Sequence[tuple[str, str]] | None = None,
                     kind: str = "custom", align: bool = False, pad_token_id: int = 0) -> PatchPair:
        """A pair from two prepared batches.

        Args:
            answers: ``[(clean answer, corrupted answer)]`` per row; default from the batches' samples
                (:func:`default_answers`).
            align: insert masked pad slots where a segment's token counts differ (module doc); False: require
                identical layouts and raise :class:`SpanError` naming the first mismatching group or length.
            pad_token_id: token id of inserted pad slots (``align=True``).
        """
        if len(clean) != len(corrupted):
            raise SpanError(f"The clean batch has {len(clean)} prompts but the corrupted batch has {len(corrupted)}; "
                            "a pair needs one corrupted prompt per clean prompt.")
        missing = [n for n in clean.spans.names if n not in corrupted.spans] + [
            n for n in corrupted.spans.names if n not in clean.spans]
        if missing:
            raise SpanError(f"Token group {missing[0]!r} exists in only one of the clean/corrupted batches "
                            f"(clean: {clean.spans.names}; corrupted: {corrupted.spans.names}).")
        unaligned: tuple[str, ...] = ()
        if align:
            clean, corrupted = align_batches(clean, corrupted, pad_token_id)
            unaligned = tuple(n for n in clean.spans.names
                              if not torch.equal(clean.spans.masks[n].cpu(), corrupted.spans.masks[n].cpu()))
            if unaligned:
                logger.info("Pair aligned with masked pad slots; groups %s differ in token count and can be patched "
                            "only by position.", list(unaligned))
        else:
            check_aligned(clean, corrupted)
        if answers is None and clean.samples is not None and corrupted.samples is not None:
            answers = default_answers(clean.samples, corrupted.samples)
        return cls(clean, corrupted, list(answers) if answers is not None else None, kind, unaligned)

    @classmethod
    def from_samples(cls, model: HookedMLLM, clean: Sequence[Any], corrupted: Sequence[Any],
                     answers: Sequence[tuple[str, str]] | None = None, kind: str = "custom",
                     align: bool = True) -> PatchPair:
        """A pair from two lists of samples (or segment lists), prepared with ``model`` and aligned."""
        if not clean or len(clean) != len(corrupted):
            raise SpanError(f"Need the same (non-zero) number of clean and corrupted prompts; got {len(clean)} and "
                            f"{len(corrupted)}.")
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        return cls.from_batches(model.prepare(list(clean)), model.prepare(list(corrupted)), answers, kind, align, pad)


# ---------------------------------------------------------------------------------------------- answers
def default_answers(clean: Sequence[Any], corrupted: Sequence[Any]) -> list[tuple[str, str]]:
    """Per row ``(clean following answer, corrupted following answer)``; where these coincide,
    ``(clean following answer, clean competitor answer)``."""
    out = []
    for c, k in zip(clean, corrupted):
        a, b = c.following_answer, k.following_answer
        out.append((a, b) if str(a).strip().lower() != str(b).strip().lower() else (a, c.competitor_answer))
    return out


def instruction_flip(model: HookedMLLM, samples: Sequence[Any]) -> PatchPair:
    """Clean = the samples; corrupted = the same image and context with the *other* modality instruction.

    The corrupted sample follows the other modality, so the metric compares the clean following answer with the
    clean competitor answer (the corrupted following answer). The two instructions differ in length: the pair
    is aligned with masked pad slots and ``instruction`` is unaligned (module doc).
    """
    flipped = []
    for i, s in enumerate(samples):
        if s.instruction not in INSTRUCTIONS.values():
            raise SpanError(f"Sample {i} ({getattr(s, 'id', '')!r}) has instruction {s.instruction!r}, not one of the "
                            "two standard modality instructions; build the pair with PatchPair.from_samples.")
        other = "text" if s.follow == "image" else "image"
        flipped.append(replace(s, follow=other, instruction=INSTRUCTIONS[other]))
    answers = [(s.following_answer, s.competitor_answer) for s in samples]
    return PatchPair.from_samples(model, samples, flipped, answers, kind="instruction")


def _swap(model: HookedMLLM, samples: Sequence[Any], donors: Sequence[Any], part: str, answer: str,
          kind: str) -> PatchPair:
    if len(donors) != len(samples):
        raise SpanError(f"Got {len(donors)} donors for {len(samples)} samples; give one donor per sample.")
    corrupted, answers = [], []
    for i, (s, d) in enumerate(zip(samples, donors)):
        if getattr(s, part) is None or getattr(d, part) is None:
            raise SpanError(f"Sample {i} or its donor has no {part}; a {kind} swap needs both.")
        corrupted.append(replace(s, **{part: getattr(d, part), answer: getattr(d, answer)}))
        answers.append((getattr(s, answer), getattr(d, answer)))
    return PatchPair.from_samples(model, samples, corrupted, answers, kind=kind)


def image_swap(model: HookedMLLM, samples: Sequence[Any], donors: Sequence[Any]) -> PatchPair:
    """Clean = the samples; corrupted = the same text with donor ``i``'s image (and image answer).

    Answers: ``(sample.answer_img, donor.answer_img)`` (donors should ask the same task).
    """
    return _swap(model, samples, donors, "image", "answer_img", "image")


def context_swap(model: HookedMLLM, samples: Sequence[Any], donors: Sequence[Any]) -> PatchPair:
    """Clean = the samples; corrupted = the same image with donor ``i``'s text context (and text answer).

    Answers: ``(sample.answer_text, donor.answer_text)``.
    """
    return _swap(model, samples, donors, "context", "answer_text", "context")


# -------------------------------------------------------------------------------------------- alignment
def _row_runs(spans: Spans, attention_mask: Tensor, row: int) -> list[tuple[str, list[int]]]:
    """Segments of one prompt as runs ``(group, positions)`` over its attended positions."""
    names = [n for n in spans.names if n not in AGGREGATE_GROUPS]
    masks = torch.stack([spans.masks[n][row].cpu() for n in names]) if names else torch.zeros(0, 0, dtype=torch.bool)
    runs: list[tuple[str, list[int]]] = []
    for p in attention_mask[row].cpu().nonzero().flatten().tolist():
        hit = masks[:, p].nonzero().flatten().tolist()
        g = names[hit[0]] if hit else "<none>"
        if runs and runs[-1][0] == g:
            runs[-1][1].append(p)
        else:
            runs.append((g, [p]))
    return runs


def align_batches(clean: MLLMBatch, corrupted: MLLMBatch, pad_token_id: int = 0) -> tuple[MLLMBatch, MLLMBatch]:
    """Lay both batches out so that every segment starts at the same position (masked pad slots, module doc)."""
    layouts: list[tuple[list[int | None], list[int | None]]] = []
    for i in range(len(clean)):
        rc = _row_runs(clean.spans, clean.attention_mask, i)
        rk = _row_runs(corrupted.spans, corrupted.attention_mask, i)
        for j in range(max(len(rc), len(rk))):
            gc = rc[j][0] if j < len(rc) else "<end>"
            gk = rk[j][0] if j < len(rk) else "<end>"
            if gc != gk:
                raise SpanError(f"Row {i}: the prompts' segments differ in order: segment {j} is {gc!r} in the clean "
                                f"prompt but {gk!r} in the corrupted one (clean: {[g for g, _ in rc]}; corrupted: "
                                f"{[g for g, _ in rk]}). Patching needs prompts with the same segments.")
        lc: list[int | None] = []
        lk: list[int | None] = []
        for j, ((_, pc), (_, pk)) in enumerate(zip(rc, rk)):
            n = max(len(pc), len(pk))
            last = j == len(rc) - 1
            for src, dst in ((pc, lc), (pk, lk)):
                pads: list[int | None] = [None] * (n - len(src))
                dst.extend(pads + list(src) if last else list(src) + pads)
        layouts.append((lc, lk))
    L = max(len(lc) for lc, _ in layouts)
    return (_relayout(clean, [lc for lc, _ in layouts], L, pad_token_id),
            _relayout(corrupted, [lk for _, lk in layouts], L, pad_token_id))


def _relayout(batch: MLLMBatch, layouts: list[list[int | None]], L: int, pad_id: int) -> MLLMBatch:
    B = len(batch)
    dev = batch.tokens.device
    tokens = torch.full((B, L), pad_id, dtype=batch.tokens.dtype, device=dev)
    attn = torch.zeros((B, L), dtype=batch.attention_mask.dtype, device=dev)
    masks = {n: torch.zeros((B, L), dtype=torch.bool, device=dev) for n in batch.spans.names}
    rp_old = batch.rope_positions
    rp = None if rp_old is None else torch.zeros(rp_old.shape[0], B, L, dtype=rp_old.dtype, device=rp_old.device)
    for i, lay in enumerate(layouts):
        off = L - len(lay)
        new = [off + j for j, p in enumerate(lay) if p is not None]
        old = [p for p in lay if p is not None]
        new_t = torch.tensor(new, dtype=torch.long, device=dev)
        old_t = torch.tensor(old, dtype=torch.long, device=dev)
        tokens[i, new_t] = batch.tokens[i, old_t]
        attn[i, new_t] = 1
        for n in masks:
            masks[n][i, new_t] = batch.spans.masks[n][i, old_t].to(dev)
        if rp is not None:  # real tokens keep their rotary positions; pad slots get 0 (as left padding does)
            rp[:, i, new_t.to(rp.device)] = rp_old[:, i, old_t.to(rp.device)]
    if "last" in masks:
        masks["last"][:] = False
        masks["last"][:, -1] = True
    return replace(batch, tokens=tokens, attention_mask=attn, spans=Spans(masks), rope_positions=rp)


def check_aligned(clean: MLLMBatch, corrupted: MLLMBatch) -> None:
    """Raise :class:`SpanError` naming the first difference: a group's token count, the length, a group's
    positions, or the padding."""
    hint = " Use PatchPair.from_batches(..., align=True) to align segments with masked pad slots."
    for n in clean.spans.names:  # the root cause first: a segment with a different token count
        ca, cb = clean.spans.masks[n].sum(1).cpu(), corrupted.spans.masks[n].sum(1).cpu()
        if not torch.equal(ca, cb):
            raise SpanError(_unaligned_message(clean.spans, corrupted.spans, n) + hint)
    if clean.seq_len != corrupted.seq_len:
        raise SpanError(f"The clean batch has length {clean.seq_len} but the corrupted batch {corrupted.seq_len}; "
                        "positions do not correspond." + hint)
    for n in clean.spans.names:
        if not torch.equal(clean.spans.masks[n].cpu(), corrupted.spans.masks[n].cpu()):
            raise SpanError(_unaligned_message(clean.spans, corrupted.spans, n) + hint)
    if not torch.equal(clean.attention_mask.cpu(), corrupted.attention_mask.cpu()):
        row = int((clean.attention_mask.cpu() != corrupted.attention_mask.cpu()).any(1).nonzero()[0])
        raise SpanError(f"Row {row}: the clean and corrupted prompts are padded differently (attention masks differ).")


def _unaligned_message(a: Spans, b: Spans, name: str) -> str:
    ma, mb = a.masks[name].cpu(), b.masks[name].cpu()
    diff_count = (ma.sum(1) != mb.sum(1)).nonzero().flatten()
    diff_pos = (ma != mb).any(1).nonzero().flatten() if ma.shape == mb.shape else diff_count
    row = int(diff_count[0]) if len(diff_count) else int(diff_pos[0]) if len(diff_pos) else 0
    na, nb = int(ma[row].sum()), int(mb[row].sum())
    if na != nb:
        return (f"Token group {name!r} has {na} tokens in the clean prompt but {nb} in the corrupted prompt (row "
                f"{row}); its tokens do not correspond, so it cannot be patched as a whole group. Patch it by "
                "position, or use prompts whose segments have equal token counts.")
    pa, pb = ma[row].nonzero().flatten().tolist(), mb[row].nonzero().flatten().tolist()
    return (f"Token group {name!r} sits at positions {pa[:3]}… in the clean prompt but {pb[:3]}… in the corrupted "
            f"prompt (row {row}).")


__all__ = ["PatchPair", "align_batches", "check_aligned", "context_swap", "default_answers", "image_swap",
           "instruction_flip"]
